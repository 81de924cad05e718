"""Checkpoints and resuming: an interrupted run goes on to the result an uninterrupted one gives, bit for bit."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.optim.optimizer as optimizer_hooks
from torch import nn

import bench
import checkpoints
import data
import distributed
import fedlearn
from checkpoints import Checkpoint
from common import Run
from test_all import TINY, fresh_split


class Interrupt:
    """Interrupts a run as a kill would (KeyboardInterrupt, as Ctrl-C leaves it): "mid-round": after the first
    optimizer step of its second round (torch's global hook); "boundary": at the end of its second round, its
    checkpoint on the disk (a hook after the checkpoint's)."""

    def __init__(self, kind):
        self.kind, self.hook = kind, None

    def round_started(self, run):
        if self.kind == "mid-round" and len(run.history) == 1:
            self.hook = optimizer_hooks.register_optimizer_step_post_hook(self.stop)

    def stop(self, *args):
        self.hook.remove()
        raise KeyboardInterrupt

    def round_ended(self, run, entry, deployed):
        if self.kind == "boundary" and entry["round"] == 2:
            assert checkpoints.writer.wait() is None
            raise KeyboardInterrupt


TORN = []  # the files `half_written` tore


def half_written(checkpoint, file, write=torch.save):
    """`torch.save` of the second round's checkpoint torn halfway, as a kill while writing leaves it (in the
    thread that writes checkpoints)."""
    if len(checkpoint["run"]["history"]) != 2:
        return write(checkpoint, file)
    whole = io.BytesIO()
    write(checkpoint, whole)
    file.write(whole.getvalue()[:len(whole.getvalue()) // 2])
    TORN.append(file)
    raise KeyboardInterrupt


def interrupting(name, kind):
    """`bench.SCHEMES[name]` interrupted (`Interrupt`) after the hooks the bench gives it."""
    def interrupted(*args, train=bench.SCHEMES[name], hooks=(), **kwargs):
        return train(*args, hooks=[*hooks, Interrupt(kind)], **kwargs)
    return interrupted


def state_of(result):
    return [value for model in result["models"] for value in model.state_dict().values()]


def test_every_loop_resumed_after_a_kill_mid_round_at_its_end_or_mid_write_equals_its_uninterrupted_run(tmp_path):
    """Every model copy, optimizer state, the ledger, the history and the loop's own state (split learning's
    holder of the client part) come back: the resumed run equals the uninterrupted one bit for bit."""
    train_sets, test_sets = data.synthetic_sites(num_sites=2, image_size=32, site_sizes=[12, 8])  # a batch each
    cfg = dict(rounds=2, batch_size=8, bn="averaged", log=None, device="cpu")
    # sl-batch and sfv3 run the loops of sl-client and sfv1 (splitlearn.train, splitfed.train) with another flag.
    for name, scheme in {name: bench.SCHEMES[name] for name in ("central", "fedavg", "sl-client", "sfv1", "sfv2")}.items():
        uninterrupted = scheme(*fresh_split(), train_sets, test_sets, **cfg)
        path = tmp_path / f"{name}.pt"
        # A kill at the end (nothing left to train) takes the same path in every loop: one of each module's.
        kinds = ["mid-round"] + (["mid-write"] if name == "fedavg" else []) + \
            (["boundary"] if name in ("fedavg", "sl-client", "sfv2") else [])
        for kind in kinds:
            with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
                if kind == "mid-write":
                    patch.setattr(checkpoints.torch, "save", half_written)
                scheme(*fresh_split(), train_sets, test_sets, hooks=[Checkpoint(str(path)), Interrupt(kind)], **cfg)
            checkpoints.writer.wait()  # as the process's end would
            done = len(checkpoints.load_checkpoint(str(path))["run"]["history"])
            assert done == (2 if kind == "boundary" else 1), (name, kind)
            if kind == "mid-write":  # torn, and the torn file removed: the checkpoint before it stands
                assert TORN and not (tmp_path / f"{name}.pt.tmp").exists()
        resumed = scheme(*fresh_split(), train_sets, test_sets, hooks=[Checkpoint(str(path))], **cfg)
        for key in ("bytes", "messages", "flops", "auroc", "loss"):
            assert resumed[key] == uninterrupted[key], (name, key)
        assert [{k: v for k, v in entry.items() if k != "seconds"} for entry in resumed["history"]] == \
            [{k: v for k, v in entry.items() if k != "seconds"} for entry in uninterrupted["history"]], name
        assert all(torch.equal(a, b) for a, b in zip(state_of(resumed), state_of(uninterrupted))), name


def test_the_parties_go_on_from_the_last_round_every_one_of_them_has_a_checkpoint_of(tmp_path, monkeypatch):
    """A party keeps its last two checkpoints (one killed while it replaced the last holds only the one before);
    the parties agree on the newest round all of them hold, and each loads its checkpoint of that round."""
    transport = distributed.Transport(0, 3, None, 60, "cpu")
    for held, agreed in (([{2, 3}, {3}, {2, 3}], 3), ([{1, 2}, {1, 2}, {1}], 1), ([{2, 3}, {2}, {1}], 0)):
        # this party's vector as `agree` encodes it, plus the two others' (what rank 0's gather sums)
        monkeypatch.setattr(transport, "_gather", lambda values: [value + sum(done == 0 or done in rounds for rounds in held[1:])
                                                                  for done, value in enumerate(values)])
        monkeypatch.setattr(transport, "share", lambda values: values)
        assert transport.agree(dict.fromkeys(held[0]), 3) == agreed, held
    train_sets, test_sets = data.synthetic_sites(num_sites=2, image_size=32, site_sizes=[12, 8])
    cfg = dict(batch_size=8, bn="averaged", log=None, device="cpu")
    path = str(tmp_path / "checkpoint-server.pt")
    one_round = fedlearn.centralized(nn.Sequential(*fresh_split()), train_sets, test_sets, rounds=1,
                                     hooks=[Checkpoint(path)], **cfg)
    os.rename(path, checkpoints.previous(path))
    fedlearn.centralized(nn.Sequential(*fresh_split()), train_sets, test_sets, rounds=2, hooks=[Checkpoint(path)], **cfg)
    monkeypatch.setattr(transport, "agree", lambda found, rounds: 1 if sorted(found) == [1, 2] else None)
    monkeypatch.setattr(transport, "load_state_dict", lambda state: None)
    model = nn.Sequential(*fresh_split())
    run = Run("central", train_sets, test_sets, rounds=2, hooks=[Checkpoint(path, transport)], **cfg)
    run.place(model)
    assert list(run.rounds(model, run.optimizer(model))) == [1] and len(run.history) == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state_of(one_round)))


def test_ctrl_c_ends_the_run_with_one_line_that_says_how_to_go_on(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "main", interrupted)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--rounds", "2", "--save", "runs"])
    with pytest.raises(SystemExit) as stop:
        bench.cli()
    assert stop.value.code == 130
    assert capsys.readouterr().err == "bench.py: interrupted; go on with the same flags and --resume runs\n"


def test_sigterm_ends_the_run_as_ctrl_c_does_and_leaves_no_partial_file(tmp_path):
    """A real process stopped by SIGTERM while it trains: one line that says how to go on, status 143, every file
    written whole (none half-written beside them)."""
    command = [sys.executable, "bench.py", *TINY, "--rounds", "50", "--schemes", "sl-client", "--save", str(tmp_path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={key: value for key, value in os.environ.items() if key != "RANK"}) as process:
        for line in process.stdout:
            if "round 2/50" in line:  # (a checkpoint is written after every round: the signal lands among them)
                process.send_signal(signal.SIGTERM)
                break
        _, err = process.communicate(timeout=120)
    assert process.returncode == 143
    assert err == f"bench.py: stopped (SIGTERM); go on with the same flags and --resume {tmp_path}\n"
    assert not list(tmp_path.rglob("*.tmp")) and (tmp_path / "run.json").exists()
    assert checkpoints.load_checkpoint(str(tmp_path / "sl-client" / "checkpoint.pt"))["run"]["history"]


RESUMABLE = TINY + ["--rounds", "2", "--schemes", "central,sl-client"]


@pytest.fixture(scope="module")
def bench_resumed(tmp_path_factory):
    """The bench with --save, uninterrupted; and killed in sl-client's second round (central finished), then
    resumed with the process's clock an hour on. Returns (rows, folder) of each."""
    folders = {how: tmp_path_factory.mktemp(how) for how in ("uninterrupted", "resumed")}
    with contextlib.redirect_stdout(io.StringIO()):
        expected = bench.main(RESUMABLE + ["--save", str(folders["uninterrupted"])])
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(bench.SCHEMES, "sl-client", interrupting("sl-client", "mid-round"))
            with pytest.raises(KeyboardInterrupt):
                bench.main(RESUMABLE + ["--save", str(folders["resumed"])])
        checkpoints.writer.wait()
        with pytest.MonkeyPatch.context() as patch:
            perf_counter = time.perf_counter
            patch.setattr(time, "perf_counter", lambda: perf_counter() + 3600)
            got = bench.main(RESUMABLE + ["--resume", str(folders["resumed"])])
    return (expected, folders["uninterrupted"]), (got, folders["resumed"])


def without_times(row):
    timed = ("seconds", "ratio")
    return {key: ([{k: v for k, v in entry.items() if k not in timed} for entry in value] if key == "history"
                  else value) for key, value in json.loads(json.dumps(row)).items() if key not in timed}


def test_a_resumed_bench_keeps_its_finished_rows_and_equals_the_uninterrupted_run(bench_resumed):
    (expected, expected_folder), (got, folder) = bench_resumed
    assert [without_times(row) for row in got] == [without_times(row) for row in expected]
    assert 0 < got[1]["seconds"] < 3600  # the rounds trained, not the hour between the two processes
    assert [without_times(r) for r in json.loads((folder / "results.json").read_text())] == \
        [without_times(r) for r in json.loads((expected_folder / "results.json").read_text())]
    for scheme in ("central", "sl-client"):
        for site in range(2):
            saved = [torch.load(where / scheme / f"site-{site}.pt", weights_only=True) for where in (folder, expected_folder)]
            for part in ("client", "server"):
                assert saved[0][part].keys() == saved[1][part].keys()
                assert all(torch.equal(value, saved[0][part][key]) for key, value in saved[1][part].items()), scheme


def test_resume_refuses_other_settings_and_damaged_files_in_one_line_overwriting_nothing(bench_resumed, tmp_path,
                                                                                         capsys):
    folder = bench_resumed[1][1]
    damaged = tmp_path / "damaged"  # a run interrupted in sl-client, its checkpoint torn
    (damaged / "sl-client").mkdir(parents=True)
    shutil.copy(folder / "run.json", damaged / "run.json")
    (damaged / "results.json").write_text(json.dumps(json.loads((folder / "results.json").read_text())[:1]))
    whole = (folder / "sl-client" / "checkpoint.pt").read_bytes()
    (damaged / "sl-client" / "checkpoint.pt").write_bytes(whole[:len(whole) // 3])
    changed, restructured = tmp_path / "changed", tmp_path / "restructured"
    for copy in (changed, restructured):
        shutil.copytree(damaged, copy)
    at = whole.index(b"data/0") + 4096  # a weight's bytes changed, the sizes the same
    (changed / "sl-client" / "checkpoint.pt").write_bytes(whole[:at] + bytes([whole[at] ^ 1]) + whole[at + 1:])
    checkpoints.save_checkpoint(dict(settings={}, state="weights", run={}, hooks=[]),
                                str(restructured / "sl-client" / "checkpoint.pt"))  # a digest of its own, but not a run's
    malformed = []  # a folder whose JSON is not what a run wrote, field by field: one line naming the file and the field
    finished = json.loads((folder / "results.json").read_text())
    for name, settings, rows, message in [
            ("list", [], finished, "run.json holds a list, not a run's settings"),
            ("no-history", None, [{k: v for k, v in finished[0].items() if k != "history"}],
             "results.json row 0: its history is null, not a run's"),
            ("text-auroc", None, [dict(finished[0], auroc="0.9")], 'results.json row 0: its auroc is "0.9", not a run\'s'),
            ("text-history", None, [dict(finished[0], history="x")], 'results.json row 0: its history is "x", not a run\'s'),
            ("rounds", None, [dict(finished[0], history=[1, 2])], "results.json row 0: its history is not a list of rounds")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps(settings) if settings is not None
                                                  else (folder / "run.json").read_text())
        (tmp_path / name / "results.json").write_text(json.dumps(rows))
        malformed.append((tmp_path / name, message))
    files = {path: path.read_bytes() for path in [*folder.rglob("*"), *damaged.rglob("*")] if path.is_file()}
    cases = [(RESUMABLE + ["--resume", str(folder), "--cut", "pool0"], "--cut differs"),
             (RESUMABLE + ["--resume", str(folder), "--distributed", "--lr", "0.01"], "--lr differs"),  # no party started
             (RESUMABLE[:-1] + ["sl-client", "--resume", str(folder)], "--schemes differs"),
             (RESUMABLE + ["--resume", str(folder), "--seeds", "2"], "--seeds differs"),
             (RESUMABLE + ["--resume", str(folder), "--data-seed", "1"], "--data-seed differs (the run had 0, now 1)"),
             *[(RESUMABLE + ["--resume", str(broken)], f"--resume {broken}: {message}") for broken, message in malformed],
             (RESUMABLE + ["--resume", str(folder), "--rounds", "1"], "--rounds 1, but central has trained 2 already"),
             (RESUMABLE + ["--resume", str(tmp_path / "nothing")], "no run.json there"),
             (RESUMABLE + ["--resume", str(damaged)], f"{damaged / 'sl-client' / 'checkpoint.pt'}: not a whole checkpoint"),
             (RESUMABLE + ["--resume", str(changed)], f"{changed / 'sl-client' / 'checkpoint.pt'}: its contents do not "
                                                       f"match its digest"),
             (RESUMABLE + ["--resume", str(restructured)], f"{restructured / 'sl-client' / 'checkpoint.pt'}: not a "
                                                           f"checkpoint of a scheme's run (state)")]
    for argv, reason in cases:
        with pytest.raises(SystemExit) as stop:
            bench.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and reason in err, err
    assert all(path.read_bytes() == content for path, content in files.items())  # nothing overwritten
