"""bench.py end to end: the tables, the files, the flags, the estimates, failures that keep their rows."""
import copy
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attacks
import bench
import data
import estimates
import privacy
import report
from common import auroc
from test_all import TINY


class InFloat64:
    """The privacy measures, handed each round's deployed models in float64."""

    def __init__(self, privacy_measures):
        self.privacy_measures = privacy_measures

    def round_ended(self, run, entry, deployed):
        self.privacy_measures.round_ended(run, entry, [copy.deepcopy(model).double() for model in deployed])


def kept_in_float64(monkeypatch, *names):
    """These schemes' trained models are handed on in float64 while the images stay float32: the mismatch a
    model trained on a GPU meets with images on the CPU, and mended by the same line (`common.to_model`
    moves data to its model's device and dtype together). CI has no GPU; this is its guard."""
    for name in names:
        def in_float64(*args, train=bench.SCHEMES[name], hooks=(), **kwargs):
            hooks = [InFloat64(hook) if isinstance(hook, privacy.Measures) else hook for hook in hooks]
            result = train(*args, hooks=hooks, **kwargs)
            result["models"] = [model.double() for model in result["models"]]
            return result
        monkeypatch.setitem(bench.SCHEMES, name, in_float64)


def test_every_measurement_puts_the_images_where_the_model_is(tmp_path, monkeypatch, capsys):
    kept_in_float64(monkeypatch, "central", "sl-client", "sfv3")
    monkeypatch.setattr(attacks, "CUTS", ("conv0", "transition2", "norm5"))  # the sweep at three cuts
    rows = bench.main(TINY + ["--schemes", "central,sl-client,sfv3", "--label-private", "--attack", "--attack-steps", "30",
                              "--cuts-sweep",
                              "--save", str(tmp_path)])
    assert not [row.get("error") or row["failed"] for row in rows if row.get("error") or row.get("failed")]
    assert "error" not in capsys.readouterr().err  # the cuts sweep too
    assert all({"dcor", "attack", "label_leak"} <= set(row["privacy"]) for row in rows[1:])
    model = report.load_site_model(tmp_path / "sfv3" / "site-0.pt")
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 1)


def test_a_failing_measurement_keeps_its_row_and_names_itself(tmp_path, monkeypatch, capsys):
    def wrong_device(*args, **kwargs):
        raise RuntimeError("Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor) should be the same")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(privacy, "dependence", wrong_device)
    monkeypatch.setattr(report, "save_models", disk_full)
    rows_path = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", *TINY, "--schemes", "central,sl-client", "--save", str(tmp_path),
                                      "--json", str(rows_path)])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 1
    rows = json.loads(rows_path.read_text())
    for row in rows:  # training's numbers all kept
        assert 0 <= row["auroc"] <= 1 and row["seconds"] > 0 and row["flops"]["server"] > 0 and sum(row["bytes"].values()) > 0
        assert row["failed"]["save"] == "OSError: No space left on device"
    assert row["failed"]["dCor²"].startswith("RuntimeError: Input type (torch.FloatTensor)")
    out, err = capsys.readouterr()
    table = out[out.index("AUROC: pooled"):out.index("bytes per link")].strip().splitlines()
    assert table[-1].startswith("sl-client") and table[-1].endswith("dCor² failed") and "server 1.00" in table[-2]
    assert "bench.py: error: sl-client (seed 0): dCor² failed: RuntimeError: Input type" in err
    assert len([line for line in err.splitlines() if line.startswith("bench.py: error:")]) == 3


def test_a_failure_anywhere_in_the_privacy_measures_keeps_every_row(tmp_path, monkeypatch, capsys):
    """Not only a wrapped step: an error in `privacy.measure` itself (here in making a leak line) is named in each row,
    whose training numbers stay, and the run exits 1. One site (no attacker's images) is no error at all."""
    def broken(*args, **kwargs):
        raise KeyError("ssim_floor")
    rows = bench.main([*TINY, "--site-sizes", "16", "--schemes", "central,sl-client"])
    assert all(not row.get("failed") and row["auroc"] is not None for row in rows)
    monkeypatch.setattr(privacy, "entry", broken)
    monkeypatch.setattr(sys, "argv", ["bench.py", *TINY, "--schemes", "central,fedavg", "--json", str(tmp_path / "rows.json")])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 1
    for row in json.loads((tmp_path / "rows.json").read_text()):
        assert 0 <= row["auroc"] <= 1 and sum(row["bytes"].values()) > 0 and row["failed"] == {"privacy": "KeyError: 'ssim_floor'"}
    assert "bench.py: error: fedavg (seed 0): privacy failed: KeyError: 'ssim_floor'" in capsys.readouterr().err


def test_deterministic_flag_on_the_cpu_changes_nothing(tmp_path):
    for flag in (["--deterministic"], []):
        bench.main(TINY + ["--schemes", "sl-batch", "--save", str(tmp_path / str(len(flag)))] + flag)
    assert not torch.are_deterministic_algorithms_enabled()  # the next run is back to the default
    saved = [torch.load(tmp_path / str(n) / "sl-batch" / "site-0.pt", weights_only=True) for n in (0, 1)]
    for part in ("client", "server"):
        assert all(torch.equal(value, saved[1][part][key]) for key, value in saved[0][part].items())


def test_bench_smoke_all_seven_schemes_json_and_csv(tiny_run):
    rows, out, tmp_path = tiny_run
    assert [row["scheme"] for row in rows] == list(bench.SCHEMES)
    assert not any(row.get("error") for row in rows)
    assert all(0 <= row["auroc"] <= 1 and row["seconds"] > 0 for row in rows)
    assert "sfv3 round 1/1 loss" in out and out.rstrip().splitlines()[-1].startswith("sfv3")
    assert [row["scheme"] for row in json.loads((tmp_path / "rows.json").read_text())] == list(bench.SCHEMES)
    with open(tmp_path / "rows.csv") as file:
        written = list(csv.DictReader(file))
    assert [row["scheme"] for row in written] == list(bench.SCHEMES)
    assert written[0]["leak_worst_attacker"] == "server" and float(written[0]["leak_worst_ssim"]) >= 0.99  # central


JSON_FIELDS = {"scheme", "seed", "bn", "order", "defense", "auroc", "auroc_interval", "site_auroc", "accuracy", "loss",
               "bytes", "messages", "flops", "seconds", "history", "parallel", "num_examples", "deploy_seconds",
               "privacy", "ratio", "leak", "leak_worst"}


def test_the_tables_fit_120_columns_and_the_json_keeps_every_field(tiny_run, capsys):
    rows, out, folder = tiny_run
    tables = out[out.index("\nAUROC: pooled"):]
    assert max(map(len, tables.splitlines())) <= 120 and "c->agg" in tables and "×central" in tables
    assert all(JSON_FIELDS <= set(row) for row in json.loads((folder / "rows.json").read_text()))
    three_seeds = [dict(row, seed=seed, auroc=row["auroc"] - seed / 100, seconds=row["seconds"] + seed)
                   for seed in range(3) for row in rows]
    report.add_ratios(three_seeds)
    wired = [dict(row, wire_bytes=row["bytes"]) for row in rows]  # as --distributed adds its wire column
    for table in (report.results_table(three_seeds), report.costs_table(wired)):
        assert max(map(len, table.splitlines())) <= 120, table
    bench.main(TINY + ["--costs-only", "--label-private"])
    assert max(map(len, capsys.readouterr().out.splitlines())) <= 120


def test_help_comes_in_five_groups_each_default_said_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as stop:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and max(map(len, out.splitlines())) <= 120
    titles = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles == ["options", "data", "training", "what to measure", "real processes", "output"]
    assert "(default: None)" not in out and "(default: False)" not in out
    assert all(flag.count("default") <= 1 for flag in re.split(r"\n  (?=-)", out))


def test_the_time_estimate_comes_after_the_first_round_and_extrapolates_what_was_measured(tiny_run, monkeypatch):
    """In the run: the first line right after the first trained round, one more after each scheme but the last.
    Its arithmetic on a clock given by hand (a wall time measured here would flip with the machine's load)."""
    lines = tiny_run[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("expected:"))
    assert lines[first - 1].startswith("central round 1/1") and "for the run" in lines[first]
    assert sum(line.startswith("expected: about") and "more" in line for line in lines) == 6  # after each but the last
    said, clock = [], iter([0.0, 12.0, 70.0, 70.0, 150.0])
    monkeypatch.setattr(estimates.time, "perf_counter", lambda: next(clock))
    estimate = estimates.Estimate(7, 5, lambda line, **options: said.append(line))
    estimate.job_started()
    estimate.round_ended()  # the first round took 12 s: 7 schemes x 5 rounds of it
    estimate.round_ended()  # (said once)
    estimate.job_ended()  # central took 70 s
    estimate.job_started()
    estimate.job_ended()  # fedavg 80 s: 75 s a scheme, 5 left
    assert said == ["expected: about 7 min for the run (7 x 5 rounds at 12.0 s, as this first one took)",
                    "expected: about 7 min more (1 of 7 done in 70 s)",
                    "expected: about 6 min more (2 of 7 done in 2 min)"]


@pytest.mark.extras
def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = bench.main(TINY + ["--rounds", "2", "--schemes", "central,sfv2", "--plot", str(tmp_path / "bench.png")])
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(row["bn"] == "local" and len(row["history"]) == 2 for row in rows)


def test_plot_without_matplotlib_is_a_one_line_error_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as stop:
        bench.main(TINY + ["--plot", "out.png"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "[plot]" in err and len(err.strip().splitlines()) == 1


def test_costs_only_predicts_exactly_what_training_counts(tiny_run):
    trained = tiny_run[0]
    predicted = bench.main(TINY + ["--costs-only"])
    for real, costs in zip(trained, predicted):
        assert costs["bytes"] == real["bytes"] and costs["flops"] == real["flops"], real["scheme"]
        assert costs["deploy_seconds"] == real["deploy_seconds"]


def test_profile_splits_training_time_and_reports_memory(capsys):
    bench.main(TINY + ["--schemes", "sl-client", "--profile"])
    out = capsys.readouterr().out.splitlines()
    header = out.index(next(line for line in out if line.startswith("scheme") and "images/s" in line))
    cells = out[header + 1].split()
    assert cells[0] == "sl-client" and float(cells[1]) > 0
    forward, backward, optimizer, transfers, other = [float(cell.rstrip("%")) for cell in cells[2:7]]
    # "other" is what the four timed parts leave of the run's clock: it cannot be negative (a part timed twice,
    # or outside the clock, would make it so), and forward and backward are most of a step.
    assert forward > 0 and backward > 0 and optimizer > 0 and transfers >= 0 and other >= 0
    assert forward + backward > 50
    assert float(cells[7]) > 0 and cells[8] in ("MB", "GB")  # peak memory


def test_costs_only_at_paper_scale_with_bf16_halves_activations():
    args = ["--image-size", "224", "--site-sizes", "40,24", "--rounds", "1", "--schemes", "sl-client"]
    full, half = bench.main(args + ["--costs-only"]), bench.main(args + ["--costs-only", "--bf16"])
    assert half[0]["bytes"]["server->client"] * 2 == full[0]["bytes"]["server->client"]
    assert full[0]["bytes"]["server->client"] == 48 * 128 * 28 * 28 * 4  # 48 training images at transition1


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds"), (["--schemes", "central,magic"], "magic"), (["--cut", "layer9"], "--cut"),
    (["--image-size", "16"], "too small"), (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--lr", "nan"], "--lr"), (["--site-sizes", "3,40"], "at least 8"), (["--bn", "running"], "--bn"),
    (["--profile", "--costs-only"], "--profile"), (["--defense", "blur:1"], "blur"), (["--defense", "noise:-1"], "--defense"),
    (["--defense", "noise:0.3", "--schemes", "central,sl-client"], "central"),
    (["--defense", "gradient-noise:0.1"], "--label-private"), (["--tradeoff", "--schemes", "central"], "no defense applies to central"),
    (["--distributed", "--max-restarts", "2"], "needs --distributed and --save DIR"),
    (["--defense", "dp:1", "--schemes", "central,fedavg"], "--defense dp is for fedavg,sfv1,sfv2, not central"),
    (["--defense", "dp:1", "--clip", "inf"], "needs a finite --clip"), (["--clip", "-1"], "--clip"),
    (["--defense", "nopeek:1", "--defense", "dp:1", "--schemes", "fedavg"], "--defense nopeek is for"),
    (["--rounds", "1001"], "at most 1000"), (["--poison", "one:nan"], "--poison"), (["--max-update-ratio", "0"], "--max-update"),
    (["--image-size", "8192"], "3 sites, 8192 px, batch 32: about"), (["--batch-size", "100000"], "batch 100000: about"),
    (["--sites", "100001"], "100001 sites, 48 px"), (["--sites", "100001", "--distributed"], "processes 50 TB"),
    (["--save", "setup.py"], "--save setup.py is a file"), (["--json", "tests"], "--json tests is a folder"),
    (["--save", "setup.py/runs"], "--save: cannot write into setup.py/runs (Not a directory)"),
    (["--batch-size", "1", "--image-size", "32"], "--batch-size 1: BatchNorm cannot train on one value a channel, and "
                                                   "DenseNet-121's last block is 1x1 at 32 px: at least 2"),
])
def test_bad_flags_and_data_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_flag_from_the_command_line_has_no_traceback():
    done = subprocess.run([sys.executable, "bench.py", "--batch-size", "-3"], capture_output=True, text=True,
                          cwd=Path(bench.__file__).parent)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "--batch-size" in done.stderr


def test_a_failing_scheme_keeps_the_other_rows(tmp_path, monkeypatch, capsys):
    def explode(*args, **kwargs):
        raise FloatingPointError("loss is nan in round 1")
    monkeypatch.setitem(bench.SCHEMES, "fedavg", explode)
    rows = bench.main(TINY + ["--schemes", "sfv3,fedavg,central", "--json", str(tmp_path / "rows.json")])
    assert [row.get("error") is None for row in rows] == [True, False, True]
    assert rows[0]["ratio"] == rows[0]["seconds"] / rows[2]["seconds"]  # central ran last: sfv3 still gets its ratio
    assert "failed: FloatingPointError: loss is nan" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 3


def test_deployment_estimate_adds_half_a_round_trip_per_transfer_on_the_critical_path():
    """By hand for two sites of equal size: split learning waits for every transfer in turn, SplitFed v1's
    clients for their own (half the activations and gradients) and one upload and download of weights."""
    argv = ["--site-sizes", "32,32", "--image-size", "32", "--rounds", "2", "--batch-size", "8", "--costs-only",
            "--schemes", "sl-client,sfv1,fedavg"]
    rows = {latency: {row["scheme"]: row for row in bench.main(argv + ["--latency", str(latency)])}
            for latency in (0, 40)}
    batches = 3 * 2 * 2  # two sites of 24 training images (of 32), batches of 8, two rounds
    waited = {name: rows[40][name]["deploy_seconds"] - rows[0][name]["deploy_seconds"] for name in rows[0]}
    assert rows[0]["sl-client"]["num_examples"] == [24, 24]
    assert waited["sl-client"] == pytest.approx((2 * batches + 3) * 0.020)  # activations, gradients; 3 handoffs
    assert waited["sfv1"] == pytest.approx((2 * batches / 2 + 2 * 2) * 0.020)  # + per round an upload, a download
    assert waited["fedavg"] == pytest.approx(2 * 2 * 0.020)


def test_a_saved_model_reloads_and_scores_as_in_the_run(tmp_path):
    rows = bench.main(TINY + ["--schemes", "sfv3", "--save", str(tmp_path)])
    info = json.loads((tmp_path / "sfv3" / "model.json").read_text())
    assert info["cut"] == "transition1" and info["bn"] == "local" and json.loads((tmp_path / "results.json").read_text())
    _, test_sets = data.synthetic_sites(num_sites=2, image_size=32, site_sizes=[16, 12])
    for site, test_set in enumerate(test_sets):
        model = report.load_site_model(tmp_path / "sfv3" / f"site-{site}.pt")
        with torch.no_grad():
            scores = model(test_set.images).squeeze(1)
        assert auroc(scores, test_set.labels) == rows[0]["site_auroc"][site]


def test_an_interrupted_run_keeps_the_models_saved_before(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise FloatingPointError("loss is nan in round 1")
    monkeypatch.setitem(bench.SCHEMES, "sfv1", explode)
    bench.main(TINY + ["--schemes", "sl-client,sfv1", "--save", str(tmp_path)])
    assert sorted(p.name for p in (tmp_path / "sl-client").iterdir()) == ["checkpoint.pt", "model.json", "site-0.pt",
                                                                         "site-1.pt"]
    assert not (tmp_path / "sfv1").exists()
    assert [row["scheme"] for row in json.loads((tmp_path / "results.json").read_text())] == ["sl-client", "sfv1"]
    # weights trained on patients' images, and what they scored: their owner's alone
    assert {path.name: path.stat().st_mode & 0o777 for path in tmp_path.rglob("*") if path.is_file()} == dict.fromkeys(
        ["checkpoint.pt", "model.json", "site-0.pt", "site-1.pt", "run.json", "results.json"], 0o600)


@pytest.mark.parametrize("poison", ["1:nan", "1:1e4"])
def test_a_poisoned_update_is_refused_by_name_no_model_saved_holds_a_nan_and_the_run_goes_on(poison, tmp_path, capsys):
    """Client 1's uploads for averaging spoiled (`--poison`): FedAvg and SplitFed v1 leave them out of every round's
    average, say so, and count them; the three sites' models train on and are saved finite."""
    rows = bench.main(["--site-sizes", "16,12,12", "--image-size", "32", "--rounds", "2", "--batch-size", "8",
                       "--schemes", "fedavg,sfv1", "--poison", poison, "--save", str(tmp_path)])
    out = capsys.readouterr().out
    reason = "not finite" if poison.endswith("nan") else "x the median distance from the round's median update (limit 10)"
    for row in rows:
        assert [(entry["round"], entry["site"]) for entry in row["refused"]] == [(1, 1), (2, 1)]
        assert all(reason in entry["reason"] for entry in row["refused"]) and row["auroc"] is not None
        assert f"{row['scheme']}: client 1's update refused: " in out
        for site in range(3):
            saved = torch.load(tmp_path / row["scheme"] / f"site-{site}.pt", weights_only=True)
            assert all(value.isfinite().all() for part in saved.values() for value in part.values()
                       if value.is_floating_point())
    assert re.search(r"  refused\nfedavg .* 2 \(client 1\)\n", out)
    assert max(len(line) for line in report.results_table(rows).splitlines()) <= 120


def test_a_full_disk_costs_the_files_it_holds_only_and_names_them(tmp_path):
    """--save on a 1 MB disk: the models and the checkpoints cannot be written there; training goes on, the rows
    are printed and written to --json elsewhere, each failed file is named with its cause, the exit status is 1,
    and no partial or temporary file is left on the full disk."""
    full = tmp_path / "full"
    full.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)]).returncode:
        pytest.skip("a full disk takes root (mount -t tmpfs)")
    try:
        done = subprocess.run([sys.executable, "bench.py", *TINY, "--schemes", "fedavg", "--save", str(full),
                               "--json", str(tmp_path / "rows.json")], capture_output=True, text=True,
                              cwd=Path(bench.__file__).parent)
        left = sorted(path.name for path in full.rglob("*") if path.is_file())
    finally:
        subprocess.run(["umount", str(full)])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{full / 'fedavg' / 'checkpoint.pt'}: No space left on device" in done.stderr
    assert f"{full / 'fedavg' / 'site-0.pt'}: No space left on device" in done.stderr
    assert re.search(r"\nfedavg +0\.\d+ \[", done.stdout)  # the row, printed
    assert json.loads((tmp_path / "rows.json").read_text())[0]["auroc"] is not None
    assert not [name for name in left if name.endswith(".tmp") or name.endswith(".pt")], left
