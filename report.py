"""What a run shows: the comparison table, the privacy tables, the pictures, and the files (JSON, CSV, the saved
models, which `load_site_model` loads). `bench.py` runs the experiment and calls these; nothing here trains."""
import csv
import json
import os
import statistics
from pathlib import Path

import torch

from checkpoints import save_into, written
from common import LINKS, PARTIES, whole
from densenet_split import split_densenet121
from labelprivate import label_private

LINK_NAMES = {"client->server": "c->s", "server->client": "s->c", "client->client": "c->c",
              "client->aggregator": "c->agg", "aggregator->client": "agg->c"}


def human(number, unit=""):
    if number is None:
        return "-"
    for prefix in ("", "k", "M", "G", "T", "P"):
        if abs(number) < 1000 or prefix == "P":
            return f"{number:.3g} {prefix}{unit}".strip() if prefix or unit else f"{number:.3g}"
        number /= 1000


def name(row):
    """A row's name in the tables: its scheme, and the defense it trained under if any."""
    return row["scheme"] + (f" {row['defense']}" if row.get("defense", "none") != "none" else "")


def folder_name(row):
    """Where --save keeps a row's models: its scheme, and its defense if any (sl-client-nopeek1+noise0.3)."""
    return name(row).replace(" ", "-").replace(":", "")


def save_folder(row, args):
    """A row's folder under --save DIR: its models, model.json and its checkpoint."""
    return os.path.join(args.save, folder_name(row) + (f"-seed{row['seed']}" if args.seeds > 1 else ""))


def mean_std(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f}±{statistics.stdev(values):.{digits}f}"


def auroc_cell(done):
    """The pooled AUROC with its 95% interval, or mean ± std over seeds when there are several."""
    if len(done) > 1 or done[0]["auroc_interval"] is None:
        return mean_std([row["auroc"] for row in done])
    low, high = done[0]["auroc_interval"]
    return f"{done[0]['auroc']:.3f} [{low:.2f}, {high:.2f}]"


def _lines(rows, header, cells):
    """A table: `header`, then `cells(done)` for each scheme's rows that did not fail (a failed scheme: its cause)."""
    lines = [header]
    for scheme in dict.fromkeys(map(name, rows)):
        runs = [row for row in rows if name(row) == scheme]
        done = [row for row in runs if not row.get("error")]
        lines.append([scheme] + cells(done) if done else [scheme, "failed: " + runs[0]["error"]])
    return align(lines)


def print_tables(rows, args, distributed):
    """The results, the costs, and what the server can learn (with --attack, --label-private, --tradeoff);
    `distributed`: real processes ran (the costs then show what went on the wire)."""
    if not args.costs_only:
        print(f"\nAUROC: pooled over every site's test images, each site scored by the model it deploys (BatchNorm "
              f"statistics: {args.bn});\n[95% CI]: stratified bootstrap, 2000 resamples. wall s: training time.")
        print(results_table(rows))
    print("\nbytes per link (c: clients, s: server, agg: aggregator), FLOPs per party, deploy s: the estimated time "
          "on a real\nnetwork (--bandwidth, --latency, --client-tflops, --server-tflops)"
          + ("; wire: payload bytes the processes sent (evaluation apart); framing: what those messages took beyond "
             "their payloads (lengths, headers, and with --key a 16-byte tag per MiB)" if distributed else "") + ".")
    print(costs_table(rows))
    if args.tradeoff:
        print("\nwhat each defense buys (each measure in the round it was worst: dCor², attack, label leak; "
              "the attack: site 0's images, the attacker knowing site 1's):")
        print(tradeoff_table(rows))
    elif args.attack or args.label_private:
        print("\nwhat the server can learn (dCor² and label leak: mean over sites; the attack: site 0's images, "
              "the attacker site 1):")
        print(privacy_table(rows))
        print("\nwho could learn what about which site's images (each attacker in the round it learnt most; SSIM of its "
              "output,\nper victim image the better of its reconstruction and its prior, and in brackets of its prior "
              "alone;\ngain: (SSIM - floor) / (1 - floor), its 95% interval over the victim images; reach: the same "
              "towards an oracle\ndecoder given the victim's own pairs; how: the better attack (white-box: a decoder of "
              "the victim's weights);\nlabels: the label attack's AUROC; the round of each line is in the JSON):")
        print(leak_table(rows))


def results_table(rows):
    """AUROC (pooled, with its interval; per site), accuracy, wall time, and what the server can learn; where
    the averaging refused an update in any row, the refused updates (over the seeds, and the sites refused)."""
    refusing = any(row.get("refused") for row in rows)

    def refused_cell(done):
        refused = [entry for row in done for entry in row.get("refused") or []]
        return f"{len(refused)} (client {','.join(str(site) for site in sorted({e['site'] for e in refused}))})" if refused else "0"

    def cells(done):
        first = done[0]
        sites = [a for row in done for a in (row["site_auroc"] or []) if a is not None]
        return [auroc_cell(done) if first["auroc"] is not None else "-",
                f"{statistics.mean(sites):.2f} ({min(sites):.2f}–{max(sites):.2f})" if sites else "-",
                mean_std([row["accuracy"] for row in done], 2), mean_std([row["seconds"] for row in done], 1),
                mean_std([row["ratio"] for row in done], 2),
                "leave" if first.get("privacy", {}).get("labels_leave") else ("stay" if first.get("privacy") else "-"),
                privacy_cell(first)] + [refused_cell(done)] * refusing
    return _lines(rows, ["scheme", "AUROC [95% CI]", "site mean (min–max)", "acc", "wall s", "×central", "labels",
                         "worst leak: SSIM (floor)"] + ["refused"] * refusing, cells)


def costs_table(rows):
    """Bytes on every link and in all (and on the wire, when real processes ran), FLOPs per party and the
    deployment estimate."""
    wire = any("wire_bytes" in row for row in rows)

    def cells(done):
        first = done[0]
        return ([human(first["bytes"][link], "B") for link in LINKS] + [human(sum(first["bytes"].values()), "B")]
                + ([human(sum(first["wire_bytes"].values()), "B"), human(first.get("framing_bytes", 0), "B")]
                   if wire else [])
                + [human(first["flops"]["client"]), human(first["flops"]["server"]), human(first["deploy_seconds"])])
    return _lines(rows, ["scheme"] + [LINK_NAMES[link] for link in LINKS] + ["total"] + ["wire", "framing"] * wire
                  + ["client FLOP", "server FLOP", "deploy s"], cells)


def align(lines):
    """Columns padded to their widest cell; a short line (a failed scheme) is printed as it is."""
    widths = [max(len(line[i]) for line in lines if len(line) > i and len(line) > 2) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     if len(line) > 2 else "  ".join(line) for line in lines)


def add_ratios(rows):
    """Each row's wall time over centralized training's with the same seed, whichever ran first."""
    central = {row["seed"]: row["seconds"] for row in rows if row["scheme"] == "central" and row.get("seconds")}
    for row in rows:
        row["ratio"] = row["seconds"] / central[row["seed"]] if row.get("seconds") and row["seed"] in central else None


def privacy_cell(row, cell=None):
    """`leak_cell` (or `cell`), and ε where the row has one."""
    return (cell or leak_cell)(row) + (f", ε {row['epsilon']:.3g}" if row.get("epsilon") is not None else "")


def leak_cell(row):
    """A row's worst leak on one scale: who reconstructs site 0's images (the leak table says from what), its SSIM
    and its floor (the prior alone); where no attack ran (no --attack), the server's dCor² on the activations (`dcor_cell`), or
    what leaves a site unattacked."""
    worst = row.get("leak_worst")
    if worst:
        return f"{worst['attacker']} {worst['ssim']:.2f} ({worst['ssim_floor']:.2f})"
    if "dcor" in (row.get("privacy") or {}) or "dCor²" in row.get("failed", {}):
        return "server dCor² " + dcor_cell(row)
    lines = row.get("leak") or []
    return f"{lines[0]['attacker']} not attacked" if lines else dcor_cell(row)


def leak_table(rows):
    """Every attacker of every row (the first seed): what it received, about whose data, how much it got, in the
    round it got most (`privacy.worst_leaks`; the JSON says which round), and how (or "not attacked")."""
    lines = [["scheme", "attacker", "channel", "site", "SSIM (floor)", "gain [95%]", "reach", "how", "dCor²",
              "labels"]]
    number = lambda value, digits=3: "-" if value is None else f"{value:.{digits}f}"
    for row in rows:
        if row.get("error") or row["seed"] != rows[0]["seed"]:
            continue
        for line in row.get("leak", []):
            interval = line.get("gain_interval")
            gain = number(line["gain"], 2) + (f" [{interval[0]:.2f},{interval[1]:.2f}]" if interval else "")
            lines.append([name(row), line["attacker"], line["channel"], str(line["victim"]),
                          f"{line['ssim']:.3f} ({line['ssim_floor']:.3f})" if line["ssim"] is not None else "-",
                          gain, number(line.get("reach"), 2), how(line.get("method")),
                          number(line.get("dcor"), 2), number(line.get("label_auroc"), 2)])
    return align(lines)


def how(method):
    """A leak line's method as the leak table shows it: "white-box decoder" as "white-box", "replayed adam + BN"
    as "replay adam+BN" (the JSON keeps the whole name)."""
    return (method or "-").replace(" decoder", "").replace("replayed ", "replay ").replace(" + ", "+")


def dcor_cell(row):
    """dCor² at the cut, mean over sites, with the shuffled pairs' value; or what the scheme sends instead;
    "failed" when the measurement failed (the row's "failed" says why)."""
    found = row.get("privacy")
    if not found:
        return "-"
    if "dCor²" in row.get("failed", {}):
        return "failed"
    if "dcor" not in found:
        return found["sends"]
    return f"{statistics.mean(found['dcor']):.2f} ({statistics.mean(found['dcor_shuffled']):.2f})"


def epsilon_cell(row):
    """ε of a row's client-level differential privacy at its δ; "no ε" for noise without clipping (nothing bounds
    what one image contributes, so no ε exists) and NoPeek; "-" undefended."""
    if row.get("epsilon") is not None:
        return f"{row['epsilon']:.3g} (δ {row['delta']:g})"
    return "no ε (no clip)" if row.get("defense", "none") != "none" else "-"


def privacy_table(rows):
    lines = [["scheme", "sends", "labels leave", "dCor² (shuffled)", "SSIM (floor)", "PSNR dB (floor)",
              "label leak AUROC norm / cos"]]
    for row in rows:
        found, failed = row.get("privacy"), row.get("failed", {})
        if not found or row["seed"] != rows[0]["seed"]:
            continue
        attack, leak = found.get("attack"), found.get("label_leak")
        missing = "failed" if "attack" in failed else "-"
        lines.append([name(row), found["sends"], "yes" if found["labels_leave"] else "no", privacy_cell(row, dcor_cell),
                      f"{attack['ssim']:.3f} ({attack['ssim_floor']:.3f})" if attack else missing,
                      f"{attack['psnr']:.1f} ({attack['psnr_floor']:.1f})" if attack else missing,
                      " / ".join(mean_std([site[key] for site in leak], 2) for key in ("norm_auroc", "cosine_auroc"))
                      if leak else "failed" if "label leak" in failed else "-"])
    return align(lines)


def tradeoff_table(rows):
    """--tradeoff: per scheme and defense, AUROC against what the server can learn (each measure in its worst
    round, named after it), and what the defense costs (client FLOPs, bytes, wall time)."""
    lines = [["scheme", "defense", "AUROC [95% CI]", "dCor² (shuf.)", "SSIM-floor", "PSNR-floor", "leak norm/cos",
              "worst rounds", "ε (δ)", "client FLOP", "bytes", "wall s"]]
    for label in dict.fromkeys(map(name, rows)):
        done = [row for row in rows if name(row) == label and not row.get("error")]
        if not done:
            lines.append([label, "failed: " + next(r["error"] for r in rows if name(r) == label)])
            continue
        first = done[0]
        found, failed = first.get("privacy", {}), first.get("failed", {})
        attack, leak = found.get("attack"), found.get("label_leak")
        missing = lambda what: "failed" if what in failed else "-"
        lines.append([first["scheme"], first.get("defense", "none"), auroc_cell(done), dcor_cell(first),
                      f"{attack['ssim'] - attack['ssim_floor']:+.3f}" if attack else missing("attack"),
                      f"{attack['psnr'] - attack['psnr_floor']:+.2f}" if attack else missing("attack"),
                      "/".join(mean_std([site[key] for site in leak], 2) for key in ("norm_auroc", "cosine_auroc"))
                      if leak else missing("label leak"),
                      "/".join(str(r) for r in found.get("worst_round", {}).values()) or "-", epsilon_cell(first),
                      human(first["flops"]["client"]), human(sum(first["bytes"].values()), "B"),
                      mean_std([row["seconds"] for row in done], 1)])
    return align(lines)


def worst_gain(row):
    """A row's worst leak as the gain of its attacker over its prior (`privacy.entry`), or None (no attack ran)."""
    return row["leak_worst"]["gain"] if row.get("leak_worst") else None


def mean_dcor(row):
    return statistics.mean(row["privacy"]["dcor"]) if "dcor" in (row.get("privacy") or {}) else None


def plot_tradeoff(rows, path):
    """--tradeoff: pooled AUROC against privacy, every scheme and defense on the same axes: each point the mean
    over seeds with bars of one standard deviation each way, each curve from the undefended run up its ladder of
    strengths in order, each strength's label placed where it overlaps no other. Panels: the worst leak's gain
    over its prior (every scheme, with --attack) and dCor² at the cut (the split schemes)."""
    pyplot = plotting()
    done = [row for row in rows if not row.get("error")]
    measures = [(label, measure) for label, measure in
                (("worst leak: gain of the best attacker over its prior", worst_gain),
                 ("dCor² at the cut (worst round, mean over sites)", mean_dcor))
                if any(measure(row) is not None for row in done)]
    figure, panels = pyplot.subplots(1, len(measures), figsize=(6 * len(measures), 4.6), squeeze=False)
    for panel, (label, measure) in zip(panels[0], measures):
        labels = []
        for scheme in dict.fromkeys(row["scheme"] for row in done):
            runs = [row for row in done if row["scheme"] == scheme and measure(row) is not None]
            strength = lambda defense: 0.0 if defense == "none" else float(defense.split("+")[0].split(":")[1])
            kinds = dict.fromkeys(row["defense"].split(":")[0] for row in runs if row["defense"] != "none")
            for kind in kinds or ["undefended"]:  # (a scheme without a defense: its one point)
                defenses = ["none"] + sorted({row["defense"] for row in runs if row["defense"].split(":")[0] == kind},
                                             key=strength)
                points = []
                for defense in defenses:
                    seeds = [row for row in runs if row["defense"] == defense]
                    if seeds:
                        xs, ys = [measure(row) for row in seeds], [row["auroc"] for row in seeds]
                        spread = lambda values: statistics.stdev(values) if len(values) > 1 else 0.0
                        points.append((statistics.mean(xs), statistics.mean(ys), spread(xs), spread(ys),
                                       defense.split("+")[0].split(":")[-1]))
                drawn = panel.errorbar([p[0] for p in points], [p[1] for p in points], xerr=[p[2] for p in points],
                                       yerr=[p[3] for p in points], marker="o", capsize=2, label=f"{scheme} {kind}")
                labels += [(x, y, text, drawn[0].get_color()) for x, y, _, _, text in points]
        panel.set(xlabel=label + " (less is more private)", ylabel="pooled AUROC (mean ± sd over seeds)")
        panel.legend(fontsize=7)
        place_labels(panel, labels, figure)
    save_figure(pyplot, figure, path)


def place_labels(panel, labels, figure, size=7):
    """Each (x, y, text, colour) label beside its point at the first of a few offsets where its box overlaps no
    label placed before it (nor leaves the panel), in display pixels."""
    figure.canvas.draw()
    to_pixels, placed = panel.transData.transform, []
    inside = panel.get_window_extent()
    offsets = [(4, 4), (4, -12), (-4, 4), (-4, -12), (8, 14), (8, -22), (-8, 14), (-8, -22), (14, -4), (-14, -4)]
    for x, y, text, colour in labels:
        px, py = to_pixels((x, y))
        width, height = 0.62 * size * len(text) * figure.dpi / 72, size * figure.dpi / 72 + 2
        for dx, dy in offsets:
            left = px + dx if dx > 0 else px + dx - width
            box = (left, py + dy, left + width, py + dy + height)
            clear = all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed)
            if clear and inside.x0 <= box[0] and box[2] <= inside.x1 and inside.y0 <= box[1] and box[3] <= inside.y1:
                break
        placed.append(box)
        panel.annotate(text, (x, y), textcoords="offset points", color=colour, fontsize=size,
                       xytext=(dx * 72 / figure.dpi, dy * 72 / figure.dpi), ha="left" if dx > 0 else "right")


def curve_table(rows):
    """--inversion-curve: per client optimizer and (images, local steps), the aggregator's SSIM (the better of each
    reconstruction and its prior, `attacks.compared`), its reconstructions' own, the floor and the gain; a client
    that cannot train, with its cause under the table."""
    lines = [["client", "images", "local steps", "SSIM", "drawn", "floor", "gain"]]
    for row in rows:
        measured = [f"{row['ssim']:.3f}", f"{row['ssim_reconstructed']:.3f}", f"{row['ssim_floor']:.3f}",
                    f"{(row['ssim'] - row['ssim_floor']) / (1 - row['ssim_floor']):.2f}"] if "ssim" in row else ["-"] * 4
        lines.append([row["optimizer"], str(row["images"]), str(row["local_steps"])] + measured)
    return align(lines) + "".join(f"\n{row['optimizer']}, {row['images']} image(s): cannot train: {row['error']}"
                                  for row in rows if "error" in row)


def cuts_table(cuts):
    attack = "ssim" in cuts[0]
    lines = [["cut", "dCor²", "shuffled"] + (["SSIM", "floor", "PSNR dB", "floor"] if attack else [])]
    for row in cuts:
        lines.append([row["cut"], f"{row['dcor']:.3f}", f"{row['dcor_shuffled']:.3f}"]
                     + ([f"{row['ssim']:.3f}", f"{row['ssim_floor']:.3f}", f"{row['psnr']:.1f}",
                         f"{row['psnr_floor']:.1f}"] if attack else []))
    return align(lines)


def plot(rows, path):
    """Two panels: pooled AUROC per round for every scheme; final AUROC (with its interval) against total bytes."""
    pyplot = plotting()
    done = [row for row in rows if not row.get("error") and row.get("auroc") is not None]
    figure, (curves, tradeoff) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for index, scheme in enumerate(dict.fromkeys(row["scheme"] for row in done)):
        runs = [row for row in done if row["scheme"] == scheme]
        per_round = [statistics.mean(entry["auroc"] for entry in entries if entry["auroc"] is not None)
                     for entries in zip(*(row["history"] for row in runs))]
        curves.plot(range(1, len(per_round) + 1), per_round, marker="os^vDPX"[index % 7], label=scheme,
                    linestyle="-" if index % 2 == 0 else "--")  # lines that coincide (fedavg, sfv1) stay visible
        final = statistics.mean(row["auroc"] for row in runs)
        total = sum(runs[0]["bytes"].values())
        interval = runs[0]["auroc_interval"] if len(runs) == 1 else None
        error = [[final - interval[0]], [interval[1] - final]] if interval else None
        tradeoff.errorbar(total, final, yerr=error, fmt="o", capsize=3)
        tradeoff.annotate(scheme, (total, final), textcoords="offset points", xytext=(5, 5))
    curves.set(xlabel="round", ylabel="pooled AUROC", title="AUROC per round")
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.legend()
    tradeoff.set(xscale="log", xlabel="total bytes on all links", ylabel="final pooled AUROC (95% CI)",
                 title="AUROC against communication")
    save_figure(pyplot, figure, path)


def plot_cuts(cuts, path):
    """dCor² (and reconstruction SSIM over its floor) at every cut."""
    pyplot = plotting()
    figure, axes = pyplot.subplots(figsize=(8, 3.6))
    names = [row["cut"] for row in cuts]
    axes.plot(names, [row["dcor"] for row in cuts], marker="o", label="dCor² (images, activations)")
    axes.plot(names, [row["dcor_shuffled"] for row in cuts], linestyle=":", label="dCor², shuffled pairs")
    if "ssim" in cuts[0]:
        axes.plot(names, [row["ssim"] - row["ssim_floor"] for row in cuts], marker="s", label="SSIM above the floor")
    axes.set(xlabel="cut", ylabel="value", title="what the activations at each cut carry")
    axes.tick_params(axis="x", rotation=45)
    axes.legend()
    save_figure(pyplot, figure, path)


def plotting():
    """matplotlib's pyplot, drawing into files only (no screen): the [plot] extra."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    return pyplot


def save_figure(pyplot, figure, path):
    """`figure` laid out and written whole to `path` as a PNG, then closed."""
    figure.tight_layout()
    with written(path, "wb") as file:
        figure.savefig(file, dpi=80, format="png")
    pyplot.close(figure)


def save_models(models, row, train_sets, args, is_label_private, describe=True):
    """Each site's deployed model as {"client": state dict, "server": state dict} of CPU tensors (the parts of
    `split_densenet121(cut)`, loadable on a machine without a GPU; None: a site held by another process), and with
    `describe` beside them model.json: what it takes to load and use them (`load_site_model`)."""
    folder = save_folder(row, args)
    for site, model in enumerate(models):
        if model is None:
            continue
        with written(os.path.join(folder, f"site-{site}.pt"), "wb") as file:
            save_into({part: {key: value.cpu() for key, value in side.state_dict().items()}
                       for part, side in (("client", model[0]), ("server", model[1]))}, file)
    info = dict(scheme=row["scheme"], defense=row.get("defense", "none"), seed=row["seed"], cut=args.cut, bn=args.bn,
                image_size=args.image_size, in_channels=int(train_sets[0].images.shape[1]), num_classes=1,
                label_private=is_label_private,
                sites=[train_set.name for train_set in train_sets], files=[f"site-{site}.pt" for site in range(len(models))],
                auroc=row["auroc"], site_auroc=row["site_auroc"])
    if describe:
        write_json(info, os.path.join(folder, "model.json"))


def load_site_model(path):
    """A site's deployed model saved by `bench.py --save` (site-K.pt, with model.json beside it), ready to score: an
    eval-mode module from images (N x C x size x size, values in [0, 1]) to logits, with the saved settings as
    `model.info` (cut, image_size, bn, scheme, ...)."""
    path = Path(path)
    info = json.loads((path.parent / "model.json").read_text())
    client_model, server_model = split_densenet121(info["cut"], num_classes=info["num_classes"],
                                                   in_channels=info["in_channels"])
    if info.get("label_private"):
        client_model, server_model = label_private(client_model, server_model)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    client_model.load_state_dict(saved["client"])
    server_model.load_state_dict(saved["server"])
    model = whole(client_model, server_model).eval()
    model.info = info
    return model


def failures(rows):
    """One line per scheme that failed and per measurement that failed after training."""
    return ([f"{name(row)} (seed {row['seed']}) failed: {row['error']}" for row in rows if row.get("error")]
            + [f"{name(row)} (seed {row['seed']}): {what} failed: {cause}"
               for row in rows for what, cause in row.get("failed", {}).items()])


def write_outputs(rows, args):
    """Rewrite --json, --csv and --save's results.json with every row so far, so that nothing finished is lost.
    Each file is written whole or not at all (`written`); one that cannot be written costs that file alone: the
    others are written, then OSError names every file that failed."""
    problems = []
    for path in (args.json, args.save and os.path.join(args.save, "results.json")):
        if path:
            try:
                write_json(rows, path)
            except OSError as error:
                problems.append(str(error))
    try:
        write_csv(rows, args)
    except OSError as error:
        problems.append(str(error))
    if problems:
        raise OSError("; ".join(problems))


def write_json(value, path):
    with written(path) as file:
        json.dump(value, file, indent=1)


def write_csv(rows, args):
    """--csv: one line per row."""
    if args.csv:
        columns = (["scheme", "defense", "seed", "bn", "auroc", "auroc_low", "auroc_high", "site_auroc_mean", "site_auroc_min",
                    "site_auroc_max", "accuracy"]
                   + [f"bytes {link}" for link in LINKS] + [f"flops {party}" for party in PARTIES]
                   + ["seconds", "ratio", "deploy_seconds", "labels_leave", "dcor", "dcor_shuffled", "leak_worst_attacker",
                      "leak_worst_channel", "leak_worst_ssim", "leak_worst_floor", "epsilon", "delta", "refused", "error", "failed"])
        with written(args.csv) as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            for row in rows:
                sites = [a for a in row.get("site_auroc") or [] if a is not None]
                low, high = row.get("auroc_interval") or (None, None)
                writer.writerow([row["scheme"], row.get("defense"), row["seed"], args.bn, row.get("auroc"), low, high,
                                 statistics.mean(sites) if sites else None, min(sites, default=None),
                                 max(sites, default=None), row.get("accuracy")]
                                + [row.get("bytes", {}).get(link) for link in LINKS]
                                + [row.get("flops", {}).get(party) for party in PARTIES]
                                + [row.get("seconds"), row.get("ratio"), row.get("deploy_seconds"),
                                   row.get("privacy", {}).get("labels_leave"),
                                   *(statistics.mean(row["privacy"][key]) if "dcor" in row.get("privacy", {}) else None
                                     for key in ("dcor", "dcor_shuffled")),
                                   *((row.get("leak_worst") or {}).get(key) for key in ("attacker", "channel", "ssim",
                                                                                        "ssim_floor")),
                                   row.get("epsilon"), row.get("delta"),
                                   "; ".join(f"round {e['round']} client {e['site']}: {e['reason']}"
                                             for e in row.get("refused") or []) or None,
                                   row.get("error"),
                                   "; ".join(f"{what}: {cause}" for what, cause in row.get("failed", {}).items()) or None])
