"""Real processes (distributed.py): the same results as the simulation bit for bit, the wire, faults, restarts."""
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import bench
import contact
import densenet_split as ds
import distributed
import estimates
import launch
import report
import wire


DISTRIBUTED = ["--site-sizes", "16,12", "--image-size", "32", "--rounds", "1", "--batch-size", "8", "--threads", "1"]


ROOT = os.geteuid() == 0 and all(shutil.which(tool) for tool in ("unshare", "ip"))


@pytest.fixture(scope="module")
def distributed_and_simulated(tmp_path_factory):
    """Every scheme as three processes (server, two clients) and as the simulation, one thread each, attacked
    (--attack). Then split
    learning and SplitFed v2 for two rounds in shuffled turns (seed 0 draws 1, 0 in round 1: not the fixed
    order), their clients defended (NoPeek and noise run in the client's process); in real processes, client 1
    killed in sfv2's second round once every party has written its first checkpoint, and the parties started
    again (--max-restarts 1): sl-client kept, sfv2 going on from the round all of them have."""
    folder = tmp_path_factory.mktemp("runs")
    shuffled = ["--order", "shuffled", "--schemes", "sl-client,sfv2", "--rounds", "2", "--defense", "nopeek:1",
                "--defense", "noise:0.3"]
    try:
        runs = {("fixed", how): bench.main(DISTRIBUTED + ["--attack", "--attack-steps", "20"]
                                           + (["--distributed"] if how == "distributed" else [])
                                           + ["--save", str(folder / "fixed" / how)])
                for how in ("distributed", "simulated")}
        runs["shuffled", "simulated"] = bench.main(DISTRIBUTED + shuffled + ["--save", str(folder / "shuffled" / "simulated")])
    finally:
        torch.set_num_threads(2)
    for checkpoint in folder.glob("fixed/*/*/checkpoint*.pt"):  # most of the folder, and no test reads them
        checkpoint.unlink()
    saved, rows = folder / "shuffled" / "distributed", folder / "restarted.json"
    sfv2 = saved / report.folder_name(dict(scheme="sfv2", defense="nopeek:1+noise:0.3"))
    with process_group([sys.executable, "bench.py", *DISTRIBUTED, *shuffled, "--distributed", "--max-restarts", "1",
                        "--save", str(saved), "--json", str(rows)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as launcher:
        first = dict(re.findall(r"(client \d+|server) pid (\d+)", launcher.stdout.readline()))
        while not all((sfv2 / f"checkpoint-{party}.pt").exists() for party in ("server", "client-0", "client-1")):
            assert launcher.poll() is None
            time.sleep(0.05)
        os.kill(int(first["client 1"]), signal.SIGKILL)
        out, err = launcher.communicate(timeout=600)
    runs["shuffled", "distributed"] = json.loads(rows.read_text()) if launcher.returncode == 0 else []
    return runs, folder, (launcher.returncode, out, err, first)


def test_a_killed_party_ends_the_others_and_they_start_again_from_the_round_all_of_them_have(distributed_and_simulated):
    status, out, err, first = distributed_and_simulated[2]
    assert status == 0, err
    assert err == f"bench.py: client 1 (pid {first['client 1']}) was killed by SIGKILL; starting every party again " \
                  f"(1 of 1 restarts)\n"
    assert "restart 1: every party goes on from its checkpoints" in out
    assert "sl-client nopeek:1+noise:0.3: finished before: kept" in out
    assert out.count("sfv2 round 1/2") == 1 and out.count("sfv2 round 2/2") == 1, out  # round 1 not trained again
    again = dict(re.findall(r"(client \d+|server) pid (\d+)", out.split("restart 1:")[0].splitlines()[-1]))
    assert set(again) == set(first) and not any(alive(int(pid)) for pid in [*first.values(), *again.values()])


@pytest.mark.parametrize("order", ["fixed", "shuffled"])
def test_distributed_run_equals_the_simulation_bit_for_bit(distributed_and_simulated, order):
    runs, folder = distributed_and_simulated[:2]
    distributed, simulated = runs[order, "distributed"], runs[order, "simulated"]
    assert [row["scheme"] for row in distributed] == [row["scheme"] for row in simulated]
    assert [row["scheme"] for row in distributed] == (list(bench.SCHEMES) if order == "fixed" else ["sl-client", "sfv2"])
    assert not any(r.get("error") for r in distributed)
    for real, simulation in zip(distributed, simulated):
        name = report.folder_name(real)
        assert real["defense"] == ("nopeek:1+noise:0.3" if order == "shuffled" else "none")
        for key in ("auroc", "auroc_interval", "site_auroc", "accuracy", "bytes", "messages", "flops", "privacy", "leak",
                    "leak_worst"):  # (what each party could learn: measured in the server's process)
            assert real[key] == (list(simulation[key]) if key == "auroc_interval" else simulation[key]), (name, key)
        assert real["wire_bytes"] == real["bytes"], name  # what went on the wire is what the ledger counts
        if real["scheme"] == "fedavg":  # its evaluation sends scores and labels, and (for --attack's inversion) the
            # initial weights once: no site's deployed model (a model of each site would be twice as many bytes again)
            model_bytes = real["bytes"]["aggregator->client"] // 2  # (two sites, one model each)
            assert model_bytes < real["eval_bytes"] < 1.1 * model_bytes, name
        assert real["loss"] == pytest.approx(simulation["loss"], rel=1e-6)
        for site in range(2):
            got = torch.load(folder / order / "distributed" / name / f"site-{site}.pt", weights_only=True)
            expected = torch.load(folder / order / "simulated" / name / f"site-{site}.pt", weights_only=True)
            for part in ("client", "server"):
                assert got[part].keys() == expected[part].keys()
                for key, value in expected[part].items():
                    assert torch.equal(got[part][key], value), (name, site, part, key)


def test_in_real_processes_splitfed_clients_work_while_the_server_serves_others_and_turns_wait(distributed_and_simulated):
    rows = {row["scheme"]: row for row in distributed_and_simulated[0]["fixed", "distributed"]}
    for name, row in rows.items():
        assert set(row["busy_seconds"]) == {"server", "client 0", "client 1"}, name
        assert 0 < max(row["busy_seconds"].values()) <= row["seconds"] * 1.05, (name, row["busy_seconds"], row["seconds"])  # within the clock
        assert row["peak_memory"]["server"] >= row["start_memory"]["server"] > 0, name
    # Of the clients' busy time, the part during which another party was busy too: in SplitFed v1 and v3 a
    # client computes while the server serves the other; in split learning everyone waits for the holder of
    # the client part (but for each round's start, when every party shuffles its own batches).
    together = {name: rows[name]["overlap_seconds"] / (rows[name]["busy_seconds"]["client 0"]
                                                       + rows[name]["busy_seconds"]["client 1"])
                for name in ("sfv1", "sfv3", "sl-client")}
    assert min(together["sfv1"], together["sfv3"]) > 0.3 > 1.5 * together["sl-client"], together
    rows = distributed_and_simulated[0]["fixed", "distributed"]  # the tables with the wire column fit 120 columns
    assert max(len(line) for table in (report.results_table(rows), report.costs_table(rows))
               for line in table.splitlines()) <= 120


def test_a_client_process_of_a_three_site_fedavg_run_holds_one_model_not_three():
    """Three sites, not ten, to keep the suite inside CI's time (eleven processes took 110 s here)."""
    try:
        rows = bench.main(["--site-sizes", ",".join(["8"] * 3), "--image-size", "32", "--rounds", "1", "--batch-size",
                           "8", "--bn", "averaged", "--threads", "1", "--schemes", "fedavg", "--distributed"])
    finally:
        torch.set_num_threads(2)
    weights = 4 * sum(p.numel() for part in ds.split_densenet121() for p in part.parameters())
    grew = {party: rows[0]["peak_memory"][party] - rows[0]["start_memory"][party] for party in rows[0]["peak_memory"]}
    assert len(grew) == 4 and rows[0]["auroc"] is not None
    # One model with its Adam state, a copy of both to warm up, the average received: about 7 times its
    # weights. Three models with their Adam state would be over 13 times.
    assert max(grew[f"client {site}"] for site in range(3)) < 10 * weights, grew


@contextlib.contextmanager
def process_group(argv, **options):
    """A subprocess in a process group of its own; on leaving (done, timed out, or a failed assertion) whatever
    is left of it and of every process it started is killed."""
    process = subprocess.Popen(argv, start_new_session=True, cwd=Path(bench.__file__).parent, **options)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_in_group(argv, timeout=300):
    """`subprocess.run(argv, capture_output=True, text=True, timeout=timeout)`, but a timeout kills the
    process's whole group, not only the process."""
    with process_group(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def test_a_subprocess_that_times_out_is_killed_with_everything_it_started():
    with pytest.raises(subprocess.TimeoutExpired), process_group(
            ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True) as process:
        grandchild = int(process.stdout.readline())
        process.communicate(timeout=0.5)
    deadline = time.monotonic() + 30  # SIGKILL is sent; on a loaded machine its delivery may take a moment
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def in_private_network(script, bandwidth_mbit=None):
    """Run a shell script in a network namespace of its own (only loopback, counters for us alone)."""
    # A small bucket (and packets to fit it): a transfer waits its full time even after an idle spell. A queue
    # of a minute's traffic: nothing is dropped, so TCP never waits on a retransmission the model knows nothing of.
    shaping = (f"ip link set lo mtu 1500 && tc qdisc add dev lo root tbf rate {round(bandwidth_mbit * 1000)}kbit "
               f"burst 16kb latency 60s && " if bandwidth_mbit else "")
    return run_in_group(["unshare", "--net", "sh", "-c", f"ip link set lo up && {shaping}{script}"])


def loopback_bytes_sent(run_bench):
    return f"""read_tx() {{ awk '/lo:/ {{print $10}}' /proc/net/dev; }}
before=$(read_tx); {run_bench} >&2; after=$(read_tx); echo $((after - before))"""


@pytest.mark.skipif(not ROOT, reason="needs root, unshare and ip for a private loopback")
def test_bytes_measured_on_the_wire_are_the_ledger_plus_under_ten_percent(tmp_path):
    rows = tmp_path / "rows.json"
    done = in_private_network(loopback_bytes_sent(
        f"{sys.executable} bench.py {' '.join(DISTRIBUTED)} --rounds 1 --schemes sfv1 --distributed --json {rows}"))
    assert done.returncode == 0, done.stderr[-2000:]
    measured = int(done.stdout.split()[-1])
    ledger = sum(sum(row["bytes"].values()) for row in json.loads(rows.read_text()))
    evaluation = sum(row["eval_bytes"] for row in json.loads(rows.read_text()))
    assert ledger <= measured - evaluation <= 1.10 * ledger, (measured, ledger, evaluation)


def test_when_no_party_says_why_the_launcher_names_the_first_that_ended_and_how(monkeypatch, capsys, tmp_path):
    """A client killed by SIGKILL has no last words: the launcher says how it ended, and ends the others."""
    class Party:
        def __init__(self, argv, env, stderr, stdout):
            self.rank, self.pid, self.returncode, self.polls = int(env["RANK"]), 4240 + int(env["RANK"]), None, 0

        def poll(self):
            self.polls += 1
            if self.returncode is None and (self.rank == 2 or self.polls > 3):
                self.returncode = -signal.SIGKILL if self.rank == 2 else 1
            return self.returncode

        def terminate(self):
            self.returncode = -signal.SIGTERM

        def wait(self, timeout=None):
            return self.returncode

    monkeypatch.setattr(launch.subprocess, "Popen", Party)
    assert launch.launch(["bench.py"], 3, 1) == 1
    assert capsys.readouterr().err == "bench.py: error: client 1 (pid 4242) was killed by SIGKILL\n"


def test_the_launcher_stopped_by_sigterm_or_an_error_ends_every_party(monkeypatch, tmp_path):
    killed = []

    class Party:
        def __init__(self, argv, env, stderr, stdout):
            self.rank, self.pid, self.returncode = int(env["RANK"]), 4240 + int(env["RANK"]), None
            if self.rank == cause["fail_at"]:
                raise OSError("no such file")

        def poll(self):
            if cause["sigterm"]:
                cause["sigterm"] = False
                os.kill(os.getpid(), signal.SIGTERM)  # the launcher is told to stop while its parties run
            return self.returncode

        def terminate(self):
            killed.append(self.rank)
            self.returncode = -signal.SIGTERM

        def wait(self, timeout=None):
            return self.returncode

    monkeypatch.setattr(launch.subprocess, "Popen", Party)
    handler = signal.getsignal(signal.SIGTERM)
    for cause, expected in ((dict(sigterm=True, fail_at=None), SystemExit), (dict(sigterm=False, fail_at=2), OSError)):
        killed.clear()
        with pytest.raises(expected):
            launch.launch(["bench.py"], 3, 1)
        assert sorted(killed) == ([0, 1, 2] if expected is SystemExit else [0, 1])  # every party started is ended
        assert signal.getsignal(signal.SIGTERM) is handler


def parties_by_hand(argv, failing_rank=None, failure=""):
    """`bench.py argv --distributed` started party by party as torchrun would (RANK, WORLD_SIZE, MASTER_*), the
    party `failing_rank` first running the Python `failure` (a hook that fails); each in a group of its own."""
    env = dict(os.environ, WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(launch.free_port()),
               GLOO_SOCKET_IFNAME="lo")
    with contextlib.ExitStack() as stack:
        program = {failing_rank: ["-c", f"{failure}\nimport bench\nbench.main()"]}
        parties = [stack.enter_context(process_group(
            [sys.executable, *program.get(rank, ["bench.py"]), *argv, "--distributed"], env=dict(env, RANK=str(rank)),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)) for rank in range(3)]
        return [party.communicate(timeout=600)[1] for party in parties], [party.returncode for party in parties]


def test_an_error_in_one_party_stops_every_party_at_once_with_its_cause(tmp_path):
    """Not only a party that dies: any exception (here an out-of-memory at client 1) stops them all, well before
    the watchdog would take the silent party for dead."""
    failed_at = tmp_path / "failed"
    failure = ("import time\nfrom torch.optim.optimizer import register_optimizer_step_pre_hook\n"
               "def out_of_memory(*args):\n"
               f"    open({str(failed_at)!r}, 'w').write(str(time.time()))\n"
               "    raise RuntimeError('CUDA out of memory (a stand-in)')\n"
               "register_optimizer_step_pre_hook(out_of_memory)")
    errors, statuses = parties_by_hand(DISTRIBUTED + ["--schemes", "sfv1"], failing_rank=2, failure=failure)
    # All ended before the others' watchdogs would have taken the failed party for dead (and the line they print
    # is its cause, not its silence); timed from the failure, not from the start, which load may slow at will.
    assert statuses == [1, 1, 1] and time.time() - float(failed_at.read_text()) < distributed.GRACE_SECONDS
    for err in errors:
        assert err.strip() == "bench.py: error: client 1: sfv1: RuntimeError: CUDA out of memory (a stand-in)", err


@pytest.fixture
def store():
    """A rendezvous store on the loopback: (its port, its host's handle)."""
    port = launch.free_port()
    yield port, dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))


def test_a_party_whose_launcher_is_gone_stops_and_says_so(monkeypatch, store):
    """A party's watchdog notices that the process that started it (the launcher, torchrun's agent) is gone:
    here it started under another parent than the one it has."""
    where = f"127.0.0.1:{store[0]}"
    contacts = [contact.StoreContact(None, lambda: contact.connected(where, "run/", None, None), 5, where, 5)
                for _ in range(2)]
    stopped = []
    watchdog = contact.Watchdog(*contacts, 2, 3)
    monkeypatch.setattr(contact, "stop", lambda rank, message: stopped.append(message) or watchdog.stopped.set())
    watchdog.parent = -1
    watchdog.start()
    watchdog.join(timeout=60)  # (it ends as soon as it has stopped: the limit only bounds a failure)
    assert stopped == ["client 1: the process that started it is gone"]


def test_a_byte_flipped_on_a_store_connection_is_survived_and_a_connection_that_corrupts_is_named(store):
    """One byte of a `set` inverted on its way to the store (through a proxy), wherever it falls: the query's type
    (the store hangs up), the key's length (the store waits for bytes that never come, and torch's client for its
    answer, without a limit), the key, the value. Each time the value is stored whole within seconds, on a new
    connection. A connection that changes what the store sends, every time: the party stops after the grace
    period, naming the store and the value."""
    port, host = store
    proxy = StoreProxy(port)
    proxy.start()
    where = f"127.0.0.1:{proxy.port}"
    party = contact.StoreContact(None, lambda: contact.connected(where, "run/", None, None), 3, where, 10)
    stored = contact.Checksummed(dist.PrefixStore("run/", host))
    for offset in (0, 1, 14, 40):
        value = f"value {offset} " * 4
        assert not party.check([f"key{offset}"])  # (connected: the next bytes up are the set's)
        proxy.flip(offset)
        done = threading.Event()
        threading.Thread(target=lambda: party.set(f"key{offset}", value) or done.set(), daemon=True).start()
        assert done.wait(60), offset  # (before: the set's confirming check waited for ever)
        assert stored.get(f"key{offset}") == value.encode() and proxy.flip_at is None
    proxy.corrupting = True
    with pytest.raises(contact.LostContact, match=rf"^lost contact with the rendezvous store \({where}\) for \d+ s "
                                                  rf"\('key0' changed on the way: its checksum fails\)$"):
        party.get("key0")


def test_what_a_silent_partys_process_is_doing_is_said_as_far_as_this_machine_sees_it():
    child = subprocess.Popen([sys.executable, "-c", "import contact, json, time\n"
                              "print(json.dumps(contact.process_identity()), flush=True)\ntime.sleep(600)"],
                             stdout=subprocess.PIPE, text=True, cwd=Path(bench.__file__).parent)
    try:
        identity = json.loads(child.stdout.readline())
        assert contact.process_state(identity) == f"its process {child.pid} is alive"
        child.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 30  # (a signal is delivered in a moment, on a loaded machine a longer one)
        while contact.process_state(identity).endswith("alive") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert contact.process_state(identity) == f"its process {child.pid} is stopped"
        assert contact.process_state(dict(identity, start="1")) == f"its process {child.pid} is gone"  # a pid reused
        assert contact.process_state(dict(identity, machine="another", host="h2")) == \
               f"its process {child.pid} runs on h2, out of this party's sight"
        assert contact.process_state({"pid": "x"}) == contact.process_state([]) == "its process not known"
    finally:
        child.kill()
        child.wait()
    assert contact.process_state(identity) == f"its process {child.pid} is gone"


def alive(pid):
    """Whether process `pid` runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def in_emulated_wan(argv, num_sites, mbit=None):
    """`bench.py argv --distributed`, every party in a network namespace of its own: each client on a line of
    its own to a switch at the server, `mbit` each way, as hospitals on their own lines to a cloud server:
    parallel clients share no bandwidth. Without `mbit`, the same network unshaped. (No delay: this
    machine's kernel has no netem; a bucket of one packet and a queue of a minute's traffic, as `in_private_network`.)"""
    names = [f"wan{os.getpid() % 100000}-{party}" for party in range(num_sites + 1)]
    server = names[0]
    shaping = f"root tbf rate {round(mbit * 1000)}kbit burst 2kb latency 60s" if mbit else None
    lines = [f"trap 'for n in {' '.join(names)}; do ip netns del $n 2>/dev/null; done' EXIT", "set -e"]
    lines += [f"ip netns add {name}" for name in names]
    lines += [f"ip -n {server} link set lo up", f"ip -n {server} link add br0 type bridge",
              f"ip -n {server} addr add 10.9.0.1/24 dev br0", f"ip -n {server} link set br0 up"]
    for site, client in enumerate(names[1:]):
        lines += [f"ip -n {server} link add line{site} type veth peer name eth0 netns {client}",
                  f"ip -n {server} link set line{site} master br0 up", f"ip -n {client} link set lo up",
                  f"ip -n {client} addr add 10.9.0.{site + 2}/24 dev eth0", f"ip -n {client} link set eth0 up"]
        if shaping:
            lines += [f"ip netns exec {server} tc qdisc add dev line{site} {shaping}",
                      f"ip netns exec {client} tc qdisc add dev eth0 {shaping}"]
    port = 29400 + os.getpid() % 500
    for rank, name in enumerate(names):
        lines.append(f"ip netns exec {name} env RANK={rank} WORLD_SIZE={num_sites + 1} MASTER_ADDR=10.9.0.1 "
                     f"MASTER_PORT={port} GLOO_SOCKET_IFNAME={'br0' if rank == 0 else 'eth0'} "
                     f"{sys.executable} bench.py {' '.join(argv)} --distributed > /dev/null & pids=\"$pids $!\"")
    lines.append("set +e; status=0; for pid in $pids; do wait $pid || status=1; done; exit $status")
    return run_in_group(["sh", "-c", "\n".join(lines)])


@pytest.mark.network
@pytest.mark.skipif(not (ROOT and shutil.which("tc")), reason="needs root, ip netns and tc")
def test_over_an_emulated_wan_the_deployment_estimate_holds_for_turns_and_for_parallel_clients(tmp_path):
    """At 0.5 Mbit/s the transfers (6.7-13.2 s) take over ten times the compute of the whole run (32 px, cut
    pool0: a tiny client part to hand on or average), so two runs' compute, which on a busy machine differ by
    as much as the compute takes, cannot decide the test. sl-client waits for every transfer in turn; sfv1's
    two clients move their activations at once, each on its own line. Evaluation traffic (untimed) is kept
    small: bn averaged."""
    argv = ["--site-sizes", "16,16", "--image-size", "32", "--cut", "pool0", "--bn", "averaged", "--rounds", "1",
            "--batch-size", "4", "--threads", "1", "--schemes", "sl-client,sfv1"]
    rows = {}
    for shaped in (False, True):
        done = in_emulated_wan(argv + ["--json", str(tmp_path / f"{shaped}.json")], 2, 0.5 if shaped else None)
        assert done.returncode == 0, done.stderr[-2000:]
        rows[shaped] = json.loads((tmp_path / f"{shaped}.json").read_text())
    for unshaped, row in zip(rows[False], rows[True]):
        modelled = (estimates.deployment_seconds(row, row["parallel"], 0.5, 1.0, 1.0, 0)  # what the network adds
                    - estimates.deployment_seconds(row, row["parallel"], math.inf, 1.0, 1.0, 0))
        measured = row["seconds"] - unshaped["seconds"]
        assert 0.75 * modelled < measured < 1.25 * modelled, (row["scheme"], measured, modelled)


def test_planted_nan_and_1e4_updates_are_refused_in_real_processes_as_in_the_simulation(tmp_path):
    """Four sites, FedAvg: client 1's upload carries a NaN, client 2's is 1e4 times its weights. The aggregator's
    process refuses both by name, averages the other two, and the run equals the simulation bit for bit."""
    argv = ["--site-sizes", "12,8,8,8", "--image-size", "32", "--rounds", "1", "--batch-size", "8", "--threads", "1",
            "--schemes", "fedavg", "--poison", "1:nan", "--poison", "2:1e4"]
    try:
        runs = {how: bench.main(argv + (["--distributed"] if how == "distributed" else []) + ["--save", str(tmp_path / how)])
                for how in ("distributed", "simulated")}
    finally:
        torch.set_num_threads(2)
    for how, (row,) in runs.items():
        assert [(entry["site"], entry["reason"].split("x the")[0]) for entry in row["refused"]][0] == (1, "not finite"), how
        assert row["refused"][1]["site"] == 2 and float(row["refused"][1]["reason"].split("x the")[0]) > 1e3, how
    assert runs["distributed"][0]["refused"] == runs["simulated"][0]["refused"]
    assert runs["distributed"][0]["auroc"] == runs["simulated"][0]["auroc"]
    for site in range(4):
        saved = [torch.load(tmp_path / how / "fedavg" / f"site-{site}.pt", weights_only=True)["client"]
                 for how in ("distributed", "simulated")]
        assert all(value.isfinite().all() and torch.equal(value, saved[1][key])
                   for key, value in saved[0].items() if value.is_floating_point())


def test_a_header_that_differs_from_the_schedule_is_refused_before_anything_is_allocated(monkeypatch):
    """The receiver compares what the sender declares (the header's length, each tensor's dtype, shape, strides
    and place) with what the schedule expects before it allocates the payload: a peer claiming 256 MB gets
    nothing allocated; a header that fits is received bit for bit."""
    receiver = wire.Wire(rank=0, store=None, timeout=1, device=torch.device("cpu"))
    float32 = wire.DTYPES.index(torch.float32)

    def received(header, payload=torch.zeros(24, dtype=torch.uint8)):
        messages, allocated = [torch.tensor([len(header)]), torch.tensor(header), payload], []

        def recv(buffer, peer):
            allocated.append(buffer.numel() * buffer.element_size())
            return buffer.copy_(messages.pop(0)[:buffer.numel()])
        monkeypatch.setattr(receiver, "_recv", recv)
        try:
            return receiver.receive(1, [torch.empty(2, 3)]), allocated
        except wire.PartyFailed as error:
            return str(error), allocated
    cases = [([1] * 99, "a header of 99 numbers, server expected 8", [8]),
             ([1, float32, 2, 8192, 8192, 8192, 1, 0], "(8192, 8192) where server expected torch.float32 (2, 3)", [8, 64]),
             ([1, 99, 2, 2, 3, 3, 1, 0], "an unknown dtype", [8, 64]), ([2, float32, 2, 2, 3, 3, 1, 0], "sent 2 tensors", [8, 64]),
             ([1, float32, 2, 2, 3, 3, 1, -4], "does not fit", [8, 64]), ([1, float32, 2, 2, 3, 30, 1, 0], "does not fit", [8, 64])]
    for header, message, allocated in cases:
        got, sizes = received(header)
        assert message in got and sizes == allocated, (header, got, sizes)
    values = torch.arange(6.0).reshape(2, 3)
    (tensor,), sizes = received([1, float32, 2, 2, 3, 3, 1, 0], values.reshape(-1).view(torch.uint8))
    assert torch.equal(tensor, values) and sizes == [8, 64, 24]


def test_the_store_listens_on_master_addr_alone_and_beyond_loopback_a_run_needs_insecure(monkeypatch, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    store, listener = distributed.rendezvous_store(0, 1, 10)
    store.set("key", "value")
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    with pytest.raises(ConnectionRefusedError):  # another loopback address: the store listens on 127.0.0.1 alone
        socket.create_connection(("127.0.0.2", port), timeout=5)
    listener.close()
    for name, value in dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="192.0.2.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--site-sizes", "16,12", "--distributed"])  # (no --threads: it would outlive the test)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "MASTER_ADDR 192.0.2.1 is not a loopback address" in err and "--insecure" in err
    assert len(err.strip().splitlines()) == 1


def test_what_arrives_not_finite_stops_the_run_naming_the_sender_except_an_upload_the_averaging_refuses(monkeypatch):
    transport = distributed.Transport(0, 3, None, 1, "cpu")
    arriving = torch.tensor([1.0, math.nan])

    def recv(buffer, peer):  # each transfer: a length, a header, the payload of `arriving` (client 1 is rank 2)
        header = [1, wire.DTYPES.index(torch.float32), 1, 2, 1, 0]
        message = {1: torch.tensor([len(header)]), 6: torch.tensor(header)}.get(buffer.numel(), arriving.view(torch.uint8))
        return buffer.copy_(message)
    monkeypatch.setattr(transport.wire, "_recv", recv)
    for link in ("client->server", None):
        with pytest.raises(wire.PartyFailed, match=re.escape(
                f"client 1 failed (sent values that are not finite on {link or 'evaluation'}, refused by server)")):
            transport.transfer(1, "server", link, (torch.empty(2),))
    upload, = transport.transfer(1, "aggregator", "client->aggregator", ({"w": torch.empty(2)},))
    assert upload["w"].isnan().any()  # for the averaging to name and leave out (`robust.Screen`)
    arriving = torch.tensor([1.0, 2.0])
    assert torch.equal(transport.transfer(1, "server", "client->server", (torch.empty(2),))[0], arriving)


def test_a_party_set_up_wrong_is_one_line_and_exit_2(monkeypatch, capsys):
    """A party started by hand (as torchrun would) with its environment incomplete or out of range, a --timeout
    beyond what a timer holds, or a server that is not there: one line each, status 2, no C++ trace."""
    port = launch.free_port()  # nothing listens there
    setups = [(dict(RANK="1", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1"), [], "MASTER_PORT is not set"),
              (dict(RANK="1", MASTER_ADDR="127.0.0.1"), [], "WORLD_SIZE, MASTER_PORT are not set"),
              (dict(RANK="3", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"), [],
               "RANK 3, WORLD_SIZE 3, MASTER_PORT 29500: a party's rank is 0 to WORLD_SIZE - 1"),
              (dict(RANK="1", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="http"), [], "MASTER_PORT http"),
              (dict(RANK="1", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)), ["--timeout", "1e15"],
               "--timeout 1e+15: at most 604800 seconds"),
              (dict(RANK="1", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)), ["--timeout", "2"],
               f"client 0: cannot reach the rendezvous store at 127.0.0.1:{port} within 2 s")]
    for environment, flags, message in setups:
        for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as stop:
            bench.main(["--site-sizes", "16,12", "--distributed", *flags])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


class StoreProxy(threading.Thread):
    """A TCP proxy on the loopback between parties and the rendezvous store at `port`: `cut(seconds)` closes every
    connection through it and refuses new ones for that long, as a network blip does; `flip(offset)` inverts the
    byte `offset` bytes on in what goes to the store, once; `corrupting` (set it) inverts the last byte of every
    piece of 12 bytes or more that the store sends (its values; not the one-byte answers), as a broken link would."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.target, self.listener = port, socket.create_server(("127.0.0.1", 0))
        self.port, self.closed_until, self.connections = self.listener.getsockname()[1], 0.0, []
        self.sent, self.flip_at, self.corrupting = 0, None, False

    def run(self):
        while True:
            client, _ = self.listener.accept()
            if time.monotonic() < self.closed_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # (the store not yet listening: the client tries again, as it would directly)
                client.close()
                continue
            self.connections += [client, upstream]
            for source, destination in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(source, destination, source is client), daemon=True).start()

    def pipe(self, source, destination, up):
        with contextlib.suppress(OSError):
            while chunk := bytearray(source.recv(65536)):
                if up and self.flip_at is not None and self.sent <= self.flip_at < self.sent + len(chunk):
                    chunk[self.flip_at - self.sent] ^= 0xFF
                    self.flip_at = None
                elif not up and self.corrupting and len(chunk) >= 12:
                    chunk[-1] ^= 0xFF
                self.sent += len(chunk) if up else 0
                destination.sendall(chunk)
        with contextlib.suppress(OSError):
            destination.shutdown(socket.SHUT_RDWR)

    def flip(self, offset):
        self.flip_at = self.sent + offset

    def cut(self, seconds):
        self.closed_until = time.monotonic() + seconds
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self.connections = []


def parties_with_a_fault(argv, fault, clients_through=()):
    """The three parties of `bench.py argv --distributed` started by hand, the clients of `clients_through` (sites)
    reaching the store through a `StoreProxy`; once the server prints sfv1's first round, `fault(proxy, parties)`:
    (each party's stderr, exit statuses, seconds from the fault to the last exit)."""
    port = launch.free_port()
    proxy = StoreProxy(port)
    proxy.start()
    env = dict(os.environ, WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    with contextlib.ExitStack() as stack:
        parties = [stack.enter_context(process_group(
            [sys.executable, "bench.py", *argv, "--distributed"],
            env=dict(env, RANK=str(rank), MASTER_PORT=str(proxy.port if rank - 1 in clients_through else port)),
            stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for rank in range(3)]
        for line in parties[0].stdout:
            if "sfv1 round 1/" in line:
                start = time.monotonic()
                fault(proxy, parties)
                break
        errors = [party.communicate(timeout=600)[1] for party in parties]
    return errors, [party.returncode for party in parties], time.monotonic() - start


def test_a_store_blip_and_a_stopped_party_are_survived_with_the_undisturbed_results(tmp_path):
    """The clients' connections to the rendezvous store cut for 3 s (through a proxy: every one closed, new ones
    refused), then client 1 stopped for 10 s (SIGSTOP): within the grace period (--grace 20) the run goes on, and
    ends with the results of the simulation."""
    argv = DISTRIBUTED + ["--schemes", "sfv1", "--rounds", "3"]
    expected = bench.main(argv)[0]

    def blip_then_stop(proxy, parties):
        proxy.cut(3)
        time.sleep(4)
        parties[2].send_signal(signal.SIGSTOP)
        time.sleep(10)
        parties[2].send_signal(signal.SIGCONT)
    errors, statuses, _ = parties_with_a_fault(argv + ["--grace", "20", "--json", str(tmp_path / "rows.json")],
                                               blip_then_stop, clients_through=(0, 1))
    assert statuses == [0, 0, 0], errors
    got = json.loads((tmp_path / "rows.json").read_text())[0]
    for key in ("auroc", "site_auroc", "accuracy", "bytes", "messages", "flops"):
        assert got[key] == expected[key], key
    # (the loss is summed across the processes, in another order: equal to rounding, as in the test above)
    assert [entry["loss"] for entry in got["history"]] == pytest.approx([entry["loss"] for entry in expected["history"]],
                                                                        rel=1e-6)


def test_a_party_stopped_past_the_grace_period_or_cut_off_by_a_corrupting_link_is_named_with_its_state():
    """Client 1 stopped (SIGSTOP) for longer than --grace 5: every party stops, naming it, how long it was silent
    and that its process is stopped. Client 1's store connections changing what the store sends: client 1 stops
    after the grace period naming the store and the value, and the others with its words."""
    argv = DISTRIBUTED + ["--schemes", "sfv1", "--rounds", "3", "--grace", "5"]

    stopped = []

    def stop_for_good(proxy, parties):
        stopped.append(parties[2].pid)
        parties[2].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        for party in parties[:2]:
            party.wait(timeout=120)
        stopped.append(time.monotonic() - start)  # (how long the others took to end: a hang fails the assertion)
        parties[2].send_signal(signal.SIGCONT)  # (then it leaves too: the store is gone)
    errors, statuses, _ = parties_with_a_fault(argv, stop_for_good)
    assert statuses == [1, 1, 1] and stopped[1] < 60, (statuses, errors)
    for err in errors[:2]:  # (each from the watchdog that saw it first, or read from the store: the same words)
        assert re.fullmatch(rf"bench.py: error: client 1 failed \(silent for \d+ s; its process {stopped[0]} is "
                            rf"stopped\)", err.strip()), err

    errors, statuses, seconds = parties_with_a_fault(
        argv, lambda proxy, parties: setattr(proxy, "corrupting", True), clients_through=(1,))
    assert statuses == [1, 1, 1] and seconds < 60, (statuses, errors)
    for err in errors:
        assert re.fullmatch(r"bench.py: error: client 1: lost contact with the rendezvous store \(127.0.0.1:\d+\) for "
                            r"\d+ s \('\w+/\d+' changed on the way: its checksum fails\)", err.strip()), errors
