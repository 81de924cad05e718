"""Every party of a distributed run as a process of this machine, over loopback (`bench.py --distributed` without
torchrun): started, watched, ended together when one fails, and started again from their checkpoints up to a number
of times, as torchrun --max-restarts does. What each process runs is the caller's command; each reads its party from
the environment torchrun would set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and writes its errors as one line
"NAME: error: ...", NAME the command's script."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import secure
from secure import party_name


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(command, num_parties, threads, max_restarts=0):
    """Run `command` (a script and its arguments, for `sys.executable`) as `num_parties` processes on this machine over
    loopback, `threads` threads each; rank 0's standard output is this one's. When a party fails, the others are ended
    and, up to `max_restarts` times, all of them start again (as torchrun --max-restarts does: they resume from their
    checkpoints). Returns the exit status: 0, or 1 after one line naming the party that failed."""
    name = os.path.basename(command[0])
    for restart in range(max_restarts + 1):
        failure = start_parties(command, num_parties, threads, restart)
        if failure is None:
            return 0
        if restart < max_restarts:
            print(f"{name}: {failure}; starting every party again ({restart + 1} of {max_restarts} restarts)",
                  file=sys.stderr, flush=True)
    print(f"{name}: error: {failure}", file=sys.stderr, flush=True)
    return 1


def start_parties(command, num_parties, threads, restart):
    """One start of the parties (`launch`): None once all of them exit cleanly; else, with every party ended,
    what failed, in words: the first party to fail, in its own words or as its process ended."""
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        parties, failed = [], []
        stopped = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        try:
            for rank in range(num_parties):
                env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_parties),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
                           TORCHELASTIC_RESTART_COUNT=str(restart))
                env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, also in a network namespace of its own
                errors = open(os.path.join(folder, f"{rank}.err"), "w+")
                process = subprocess.Popen([sys.executable, *command], env=env, stderr=errors,
                                           stdout=None if rank == 0 else subprocess.DEVNULL)
                parties.append((process, errors))
            print("parties: " + ", ".join(f"{party_name(rank)} pid {process.pid}"
                                          for rank, (process, _) in enumerate(parties)), flush=True)
            while not failed and any(process.poll() is None for process, _ in parties):
                failed = [rank for rank, (process, _) in enumerate(parties) if process.poll()]
                time.sleep(0.2)
            failed = failed or [rank for rank, (process, _) in enumerate(parties) if process.returncode]
        finally:  # a party failed (the others cannot go on), Ctrl-C, SIGTERM or any error here: all are ended
            signal.signal(signal.SIGTERM, stopped)
            end_all([process for process, _ in parties])
        if not failed:
            return None
        # A party killed by a signal had no last words; one that raised names the cause (its own, or one
        # another party noted first).
        first = min(failed, key=lambda rank: (parties[rank][0].returncode > 0, rank))
        parties[first][1].seek(0)
        prefix = f"{os.path.basename(command[0])}: error: "
        said = [line.strip().removeprefix(prefix) for line in parties[first][1] if line.startswith(prefix)]
        return said[0] if said else ended(first, parties[first][0])


def end_all(processes, grace_seconds=10):
    """End `processes` as torchrun ends its workers: SIGTERM (a party stops once the checkpoint it is writing
    is whole, `stop`), and SIGKILL for any still running after `grace_seconds` (one blocked in a transfer)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace_seconds
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ended(rank, process):
    """How a party's process ended, in words: "client 1 (pid 4242) was killed by SIGKILL"."""
    status = process.returncode
    how = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
    return f"{party_name(rank)} (pid {process.pid}) {how}"


def parties(script, argv, num_parties, key=None, threads=None, max_restarts=0, json_path=None):
    """`script argv` (bench.py's flags) as every party of a federation of `num_parties`, on this machine; their kits
    (`key`, a folder of them) are checked first, before any party starts (ValueError, one line). Returns rank 0's
    rows, which it writes to `json_path` (or a temporary file); a party failing: exit with `launch`'s status."""
    if key:
        if not os.path.isdir(key):
            raise ValueError(f"--key {key}: the parties spawned here take their kits from a folder (--provision DIR)")
        for rank in range(num_parties):
            secure.load_kit(key, rank, num_parties)
    threads = threads or max(1, (os.cpu_count() or 1) // num_parties)
    with tempfile.TemporaryDirectory() as folder:
        rows_path = json_path or os.path.join(folder, "rows.json")
        status = launch([script, *argv, "--json", rows_path], num_parties, threads, max_restarts)
        if status:
            sys.exit(status)
        with open(rows_path) as file:
            return json.load(file)
