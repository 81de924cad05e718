"""Who could learn what in a run: what each party receives, recorded as it arrives (`Recorder`), measured after every
round by the attacks matched to it (`measure`, run by the `Measures` hook) and put on one scale of leak lines
(`entry`, `worst_leaks`): SSIM of a reconstruction against the attacker's prior alone, dCor², the label attacks.
"""
import math
import statistics

import torch
from torch import nn

from attacks import compared, decode, dependence, label_attacks, part_with, whitebox_attack
from common import batch_bounds, shuffled
from inversion import invert_update


class Recorder:
    """What each party receives in a round, as it arrived (after any defense), for the measures of what it could
    learn (`measure`): nothing is computed again. Kept, each round: the activations the server receives from a
    seeded sample of each site's batches, at most `keep` images a site (every training image at the default
    sizes), with the indices of the images behind them; for the same batches, the gradients of the pooled
    features a label-private client returns; the images central's server receives (once); what the victim, site
    0, uploads for averaging, and its copy's state when the round began; what a peer client receives from the
    victim in a hand-off. Under a transport every process records the same schedule: real tensors where its
    party received them, shape-only placeholders elsewhere (`measure` brings them to the server's process)."""

    def __init__(self, train_sets, batch_size, seed=0, keep=256):
        self.train_sets, self.batch_size, self.seed, self.keep = train_sets, batch_size, seed, keep
        self.state, self.images, self.start, self.averaged, self.began = (), {}, None, None, None
        self.activations, self.gradients, self.counts, self.upload, self.handoff = {}, {}, {}, None, None

    def started(self, run, state):
        self.state = state  # its first entry: site 0's copy of what it trains (every loop registers it first)

    def round_started(self, run):
        self.activations, self.gradients, self.counts, self.upload, self.handoff = {}, {}, {}, None, None
        self.began = self.averaged  # what the aggregator sent site 0 last round: the weights it starts this one from
        # site 0's starting weights, for the inversion of FedAvg's first update only (`measure`): a copy of the
        # whole model, on the round's clock, so not taken in any other round or scheme
        first = self.state[0] if self.state and isinstance(self.state[0], nn.Module) else None
        wanted = first is not None and run.scheme == "fedavg" and not run.history
        self.start = {key: value.detach().clone() for key, value in first.state_dict().items()} if wanted else None

    def sent(self, run, source, destination, link, objects):
        if link == "client->server" and run.scheme == "central":
            self.images[source] = objects[0]
        elif link == "client->server" and objects[0].dim() in (2, 4):  # activations, or returned feature gradients
            record = self.activations if objects[0].dim() == 4 else self.gradients
            batch = self.counts[source, objects[0].dim()] = self.counts.get((source, objects[0].dim()), -1) + 1
            indices = self.sampled(source, len(run.history)).get(batch)
            if indices is not None:
                record.setdefault(source, []).append((indices, objects[0].detach()))
        elif link == "client->aggregator" and source == 0:
            self.upload = {key: value.detach().clone() for key, value in objects[0].items()}
        elif link == "aggregator->client" and destination == 0 and self.activations:
            # (a split scheme's average, for its white-box attacker: FedAvg's whole model is not copied for nothing)
            self.averaged = {key: value.detach().clone() for key, value in objects[0].items()}
        elif link == "client->client" and source == 0 and self.handoff is None:
            self.handoff = destination, {key: value.detach().clone() for key, value in objects[0].items()}
        return objects

    def sampled(self, site, round):
        """The batches of `site` kept in `round`, by their number, with the indices of their images: whole batches
        in a seeded order, while they fit in `keep` images."""
        order = shuffled(self.seed, site, round, len(self.train_sets[site]))
        bounds = batch_bounds(len(order), self.batch_size)
        kept, total = {}, 0
        for batch in torch.randperm(len(bounds), generator=torch.Generator().manual_seed(self.seed + 7919 * site + round)).tolist():
            start, end = bounds[batch]
            if total + end - start <= self.keep:
                kept[batch], total = order[start:end], total + end - start
        return kept

    def received(self, site, what="activations"):
        """(indices, tensors) a site sent this round that the recorder kept, in the order they were sent."""
        record = (self.activations if what == "activations" else self.gradients).get(site, [])
        if not record:
            return None, None
        return torch.cat([indices for indices, _ in record]), torch.cat([tensor.float() for _, tensor in record])

    def batch_sizes(self, site):
        """The number of images in each batch `received` joined, in its order."""
        return [len(indices) for indices, _ in self.activations.get(site, [])]


def entry(attacker, channel, victim, found=None, **measured):
    """One line of what leaks: who could learn (`attacker`: "server", "aggregator", "server+aggregator" where
    one process is both, "server+client K" where a peer colludes, "client K" for a peer), from what (`channel`:
    "images", "activations", "weights", "labels"), about whose data (`victim`, a site), and how much: `ssim` of
    its output (per victim image the better of its reconstruction and its prior: `attacks.compared`) against
    `ssim_floor`, what its prior alone gives (the mean image of the images it knows: the same for every
    attacker), and `gain`, how far it got from the floor towards a perfect copy, (ssim - floor) / (1 - floor):
    0 nothing, 1 everything, never below 0 (the normalised gain of Hatamizadeh et al. 2023's RDLV); where an
    oracle decoder given the victim's own pairs measured what is reachable at the cut (`ssim_reachable`), `reach`,
    the same gain towards it (where the oracle itself got above the floor); `gain_interval`, the gain's 95% interval
    over the victim images (`compared`'s bootstrap); or other measures (`dcor`, `label_auroc`)."""
    found = dict(found or {}, **measured)
    row = dict(attacker=attacker, channel=channel, victim=victim, ssim=found.get("ssim"), ssim_floor=found.get("ssim_floor"))
    row["gain"] = None if row["ssim"] is None else (row["ssim"] - row["ssim_floor"]) / max(1 - row["ssim_floor"], 1e-9)
    reachable = found.get("ssim_reachable")
    if row["ssim"] is not None and reachable is not None and reachable > row["ssim_floor"] + 1e-3:
        row.update(ssim_reachable=reachable,
                   reach=(row["ssim"] - row["ssim_floor"]) / max(reachable - row["ssim_floor"], 1e-9))
    if row["gain"] is not None and found.get("gain_interval"):
        row["gain_interval"] = found["gain_interval"]
    row.update({key: found[key] for key in ("dcor", "label_auroc", "psnr", "psnr_floor", "method") if key in found})
    return row


def measure(run, recorder, deployed, attack_steps=0, attempt=lambda what, function: function()):
    """What each party could learn from what it received in the round just ended (`recorder`), measured where the
    server is (its process under a transport; the images the measures compare with travel there as evaluation
    traffic). The victim is site 0; the server knows site 1's images (a colluding hospital, or public X-rays like
    its own), which also make its prior, and a peer client its own; the server's decoder also takes site 1 as the
    victim (knowing the next site's images). Always: dCor² of every site's images and the
    activations it sent, the labels the server receives (returned gradients of a label-private client: the label
    attacks), central's images, a peer's prior. With `attack_steps`: the decoder on activations (`decode`), the
    white-box attack where the server also aggregates the client parts (`whitebox_attack`), the aggregator's
    inversion of FedAvg's update from the shared initial weights (`invert_update`, in the first round only:
    `attack_steps` / 5 steps, each a double backward pass of the whole model). Returns the round's measures and
    "leak", their `entry` lines (both empty in a process that is not the server's); `attempt(what, function)` runs
    each measure, so that a failing one is named and the others go on. `deployed`: each site's deployed model, the
    architecture into which an attacker loads the weights it received."""
    sites = range(len(run.train_sets))
    own = lambda site, indices: run.send_for_evaluation(site, "server", run.train_sets[site].images[indices],
                                                         run.train_sets[site].labels[indices])
    received = {site: recorder.received(site) for site in sites}
    indices = {site: received[site][0] if received[site][0] is not None else torch.arange(min(len(run.train_sets[site]), recorder.keep))
               for site in sites}
    inverts = run.scheme == "fedavg" and recorder.upload is not None and attack_steps and len(run.history) == 1
    if inverts:  # the victim's images in the order its first local epoch took them: the labels given, in that order
        indices[0] = shuffled(recorder.seed, 0, 0, len(run.train_sets[0]))
    images, labels = zip(*(own(site, indices[site]) for site in sites))
    start = run.send_for_evaluation(0, "server", recorder.start) if inverts else None  # (every process sends the same)
    # a colluding peer gives the server the victim's client part it was handed
    handoff = recorder.handoff and attack_steps and (
        recorder.handoff[0], run.send_for_evaluation(recorder.handoff[0], "server", recorder.handoff[1]))
    if images[0].is_meta:  # not the server's process: it measures
        return {}, []
    found, leak = {}, []
    if run.scheme == "central" and len(images) > 1:
        leak.append(entry("server", "images", 0, compared(recorder.images[0][indices[0]], images[0], images[1])))
    if received[0][1] is not None:  # a split scheme: the server receives activations
        leak += activation_attacks(run, recorder, deployed, received, images, attack_steps, attempt, found, handoff)
    if received[0][1] is not None and hasattr(deployed[0][0], "head"):  # a U-shaped split: labels stay home
        returned = {site: recorder.received(site, "gradients") for site in sites}
        label_leak_of = attempt("label leak", lambda: [label_attacks(returned[site][1], labels[site][:len(returned[site][1])])
                                                       for site in sites])
        if label_leak_of:
            found["label_leak"] = label_leak_of
            leak.append(entry("server", "labels", 0, label_auroc=label_leak_of[0]["cosine_auroc"]))
    elif received[0][1] is not None or run.scheme == "central":
        leak.append(entry("server", "labels", 0, label_auroc=1.0))  # sent with the activations (or the images)
    if inverts and len(images) > 1:
        inversion = attempt("inversion", lambda: invert_update(
            deployed[0], start, recorder.upload, images[0], labels[0], images[1], run.batch_size, run.lr,
            steps=max(attack_steps // 5, 1), seed=recorder.seed))
        if inversion:
            found["inversion"] = inversion
    if run.scheme == "fedavg":
        leak.append(entry("aggregator", "weights", 0, found.get("inversion")))
    if recorder.handoff is not None:
        # a peer receives the victim's client part and its Adam state, before and after the victim's turn: no attack
        # on them is implemented, and the line says so rather than a number
        leak.append(entry(f"client {recorder.handoff[0]}", "weights", 0, method="not attacked"))
    return found, leak


def activation_attacks(run, recorder, deployed, received, images, attack_steps, attempt, found, handoff=None):
    """`measure`'s attackers of the activations a split scheme's server received (`received`: per site, the
    recorder's (indices, activations); `images`: the images behind them): dCor² and, with `attack_steps`, the
    server's decoder on the pairs another site sent it (site 0, then site 1, in turn the victim, each decoded with the
    next site's pairs and that site's mean image as the prior), each beside the oracle (a decoder given the victim's own pairs:
    what is reachable at this cut, `ssim_reachable`); and the white-box attack where the server also holds weights
    of the victim's client part: as SplitFed's aggregator (site 0's upload, and the average it sent site 0 last
    round) or with a colluding peer (`handoff`: site 0's client part as split learning hands it on). Adds to
    `found`; returns the lines."""
    sites, leak = range(len(images)), []
    dependence_of = attempt("dCor²", lambda: [dependence(images[site], received[site][1], recorder.seed) for site in sites])
    if dependence_of:
        found.update(dcor=[d["dcor"] for d in dependence_of], dcor_shuffled=[d["dcor_shuffled"] for d in dependence_of])
    dcor = {"dcor": found["dcor"][0]} if "dcor" in found else {}
    if not attack_steps or len(sites) < 2:
        leak.append(entry("server", "activations", 0, **dcor))
        return leak
    for victim in (0, 1):  # two sites in turn as the victim, each decoded with the next site's pairs
        known = (victim + 1) % len(sites)
        what = "" if victim == 0 else f" on site {victim}"
        attack = attempt("attack" + what, lambda: decode(received[known][1], images[known], received[victim][1],
                                                         images[victim], attack_steps, seed=recorder.seed))
        reachable = attempt("oracle" + what, lambda: decode(received[victim][1], images[victim], received[victim][1],
                                                            images[victim], attack_steps, seed=recorder.seed, held_out=0))
        line = {"dcor": found["dcor"][victim]} if "dcor" in found else {}
        if reachable:
            line["ssim_reachable"] = reachable["ssim"]
        leak.append(entry("server", "activations", victim, attack or None, **line,
                          **({"method": "decoder"} if attack else {})))
        if victim == 0:  # (site 0 is the victim of every attacker: its measures are the row's)
            found.update({key: value for key, value in (("attack", attack), ("reachable", reachable)) if value})
    attack, reachable = found.get("attack"), found.get("reachable")
    held = [state for state in (recorder.began, recorder.upload) if state is not None] or ([handoff[1]] if handoff else [])
    if held:
        whitebox = attempt("white-box attack", lambda: whitebox_attack(
            [part_with(deployed[0][0], state) for state in held], received[0][1], images[0], images[1],
            run.batch_size, recorder.batch_sizes(0), attack_steps, recorder.seed))
        if whitebox:
            found["whitebox"] = whitebox
        # it holds what the server alone holds too, and keeps whichever reconstruction is better
        best = max((attack or None, whitebox), key=lambda found: -1 if not found else found["ssim"])
        attacker = "server+aggregator" if recorder.upload is not None else f"server+client {handoff[0]}"
        leak.append(entry(attacker, "activations", 0, best, method=None if not best else
                          best["method"] if best is whitebox else "decoder",
                          **({"ssim_reachable": reachable["ssim"]} if reachable else {})))
    return leak


above_floor = lambda key: lambda found: found[key]["ssim"] - found[key]["ssim_floor"]


LEAKED = dict(dcor=lambda found: statistics.mean(found["dcor"]), attack=above_floor("attack"),
              whitebox=above_floor("whitebox"), inversion=above_floor("inversion"),
              label_leak=lambda found: statistics.mean(site["cosine_auroc"] or 0.5 for site in found["label_leak"]))


def leaked(line):
    """How much a leak line says its attacker learnt, to rank lines: the gain over the floor where an attack
    reconstructed images, else dCor², else the label AUROC (each on its own 0-to-1 scale)."""
    for key in ("gain", "dcor", "label_auroc"):
        if line.get(key) is not None:
            return line[key]
    return -math.inf


def worst_leaks(history):
    """A run's leak: per attacker, channel and victim, the line of the round it learnt most in (`leaked`; the
    earliest of equals), with that round; and the worst line of all where an attack reconstructed images (by gain:
    one scale for every scheme), None where none did."""
    by_line = {}
    for round_entry in history:
        for line in (round_entry.get("privacy") or {}).get("leak", []):
            key = line["attacker"], line["channel"], line["victim"]
            if key not in by_line or leaked(line) > leaked(by_line[key]):
                by_line[key] = dict(line, round=round_entry["round"])
    lines = list(by_line.values())
    return lines, max((line for line in lines if line["gain"] is not None), key=lambda line: line["gain"], default=None)


class Measures:
    """The hook that measures, after each round (untimed), what each party could learn from what it received
    (`measure` on the `recorder`'s record), into the round's entry of the history. `attempt(what, function)` runs
    each measure, so that one that fails is named and the others go on."""

    def __init__(self, recorder, attack_steps, attempt):
        self.recorder, self.attack_steps, self.attempt = recorder, attack_steps, attempt

    def round_ended(self, run, entry, deployed):
        # (the whole measurement as one attempt too: whatever fails in it is named, and the round's training kept)
        measured = self.attempt("privacy", lambda: measure(run, self.recorder, deployed, self.attack_steps, self.attempt))
        found, leak = measured or ({}, [])
        entry["privacy"] = dict(found, leak=leak)


def what_the_server_learns(history, sends, labels_leave):
    """A row's privacy: what leaves a site (`sends`), whether labels do, and each measure of `Measures` in the round
    it was worst (the earliest of equals), with that round in "worst_round": an early, barely trained client part
    may tell more than the last."""
    found = dict(sends=sends, labels_leave=labels_leave)
    for key, score in LEAKED.items():
        measured = [entry for entry in history if key in (entry.get("privacy") or {})]
        if measured:
            worst = max(measured, key=lambda entry: score(entry["privacy"]))
            found[key] = worst["privacy"][key]
            if key == "dcor":
                found["dcor_shuffled"] = worst["privacy"]["dcor_shuffled"]
            found.setdefault("worst_round", {})[key] = worst["round"]
    return found
