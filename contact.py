"""How the parties of a `--distributed` run keep in contact through the rendezvous store (distributed.py's companion).

Every store call of a party goes through a `StoreContact`: calls of at most a few seconds, each value checked
(checksummed, `Checksummed`, or with a kit signed, `secure.SignedStore`), and a call that gets no sound answer tried
again on a new connection until `--grace` seconds pass; then the party stops, naming the store. Each party beats in
the store every second on a connection and a thread of its own (`Watchdog.beat`), so that nothing it waits for can
silence it, and its watchdog reads the others' beats: a party silent for `--grace` seconds is named with what its
process is doing, as far as this machine can see (`process_state`). `stop` leaves with one line.
"""
import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

import secure
from checkpoints import one_line, writer
from secure import party_name

HEARTBEAT_SECONDS, GRACE_SECONDS = 1.0, 20.0  # --grace's default: a party silent this long is taken for dead
STORE_CALL_SECONDS = 5.0  # a store call that takes longer failed (its connection lost, or desynchronised by a byte)
POLL_SECONDS = 0.05  # a party waiting for a key looks for it this often, each look a short call


class LostContact(RuntimeError):
    """The rendezvous store gave no sound answer within the grace period."""


class Corrupted(RuntimeError):
    """A value read from the store fails its checksum: the connection changed it on the way."""


class Checksummed:
    """The rendezvous store without a kit: each value carries a checksum of its key and itself (8 bytes of BLAKE2b),
    so that a value a connection changed on the way is caught and read again (`StoreContact`), never believed. It
    guards against faults, not against an attacker, who can compute it too: that is the kit's signature's part."""

    def __init__(self, store):
        self.store = store

    @staticmethod
    def digest(key, value):
        return hashlib.blake2b(key.encode() + b"\0" + value, digest_size=8).digest()

    def set(self, key, value):
        value = value.encode() if isinstance(value, str) else value
        self.store.set(key, self.digest(key, value) + value)

    def get(self, key):
        stored = self.store.get(key)
        if self.digest(key, stored[8:]) != stored[:8]:
            raise Corrupted(f"{key!r} changed on the way: its checksum fails")
        return stored[8:]

    def check(self, keys):
        return self.store.check(keys)


class StoreContact:
    """The rendezvous store as one thread of a party reaches it (`set`, `get`, `check`, `wait`): a call that gets no
    sound answer (the connection cut, a call timed out, a value changed on the way) is tried again on a new
    connection (`reconnect()`, whose calls last at most STORE_CALL_SECONDS) once a second, until `grace` seconds
    pass; then LostContact names the store (`where`), and so does every later call, at once. `wait` (and `get`,
    which waits for its key) waits up to `patience` seconds, looking every POLL_SECONDS. A value that fails
    authentication is raised at once; without `reconnect` (torchrun's agent's store) so is every failure.
    `reconnected`: when its latest connection was made."""

    def __init__(self, store, reconnect, grace, where, patience):
        self.store, self.reconnect, self.grace, self.where, self.patience = store, reconnect, grace, where, patience
        self.reconnected, self.gone = time.monotonic(), None

    def set(self, key, value):
        def confirmed(store):  # a set has no answer: read back, for it may be lost (a connection cut unnoticed),
            store.set(key, value)  # stored under another key, or changed on the way (the read fails its check)
            if not store.check([key]):
                raise LookupError(f"{key!r} was not stored")
            store.get(key)
        self._call(confirmed)

    def get(self, key):
        self.wait([key])
        return self._call(lambda store: store.get(key))

    def check(self, keys):
        return self._call(lambda store: store.check(keys))

    def wait(self, keys):
        deadline = time.monotonic() + self.patience
        while not self.check(keys):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {self.patience:.0f} s for {', '.join(keys)} in the rendezvous store")
            time.sleep(POLL_SECONDS)

    def once(self, key, value):
        """One try at `set`, confirmed by a `check` (a connection that a changed byte desynchronised gives it no
        answer), on a new connection if the latest failed; nothing raised. The heartbeat's, which tries again a second
        later and leaves naming a lost store to the watchdog, and a party's on its way out, saying why."""
        try:
            if self.store is None:
                self.store, self.reconnected = self.reconnect(), time.monotonic()
            bounded(lambda store: store.set(key, value) or store.check([key]), self.store)
        except Exception:  # (tried again at the next beat, on a new connection)
            self.store = None if self.reconnect else self.store

    def _call(self, function):
        if self.gone:  # (lost once for the whole grace period: a party on its way out does not wait it out again)
            raise LostContact(self.gone)
        lost = None
        while True:
            try:
                if self.store is None:
                    self.store, self.reconnected = self.reconnect(), time.monotonic()
                return bounded(function, self.store)
            except secure.AuthenticationFailed:
                raise
            except Exception as error:
                if self.reconnect is None:
                    raise
                self.store, lost = None, lost or time.monotonic()
                if time.monotonic() - lost > self.grace:
                    cause = f" ({error})" if isinstance(error, Corrupted) else ""
                    self.gone = (f"lost contact with the rendezvous store ({self.where}) for "
                                 f"{time.monotonic() - lost:.0f} s{cause}")
                    raise LostContact(self.gone) from None
                time.sleep(HEARTBEAT_SECONDS)


def bounded(function, store):
    """`function(store)`, given at most STORE_CALL_SECONDS: torch's store client waits for some answers without a
    limit (a `check`'s), and a connection that a changed byte desynchronised never gives one. Past the limit the call
    is left to its thread (it holds that connection alone, which its caller drops) and fails."""
    done, outcome = threading.Event(), []

    def call():
        try:
            outcome.append((True, function(store)))
        except Exception as error:  # (raised again in the caller's thread)
            outcome.append((False, error))
        done.set()
    threading.Thread(target=call, daemon=True).start()
    if not done.wait(STORE_CALL_SECONDS):
        raise TimeoutError(f"the rendezvous store gave no answer within {STORE_CALL_SECONDS:g} s")
    answered, value = outcome[0]
    if not answered:
        raise value
    return value


def connected(where, prefix, kit, session):
    """A new connection to the rendezvous store at `where` (host:port), each call at most STORE_CALL_SECONDS, its keys
    those of the run's start (`prefix`), its values signed as the run's are (`kit`, `session`) or checksummed."""
    host, port = where.rsplit(":", 1)
    store = dist.PrefixStore(prefix, dist.TCPStore(host, int(port), is_master=False,
                                                   timeout=timedelta(seconds=STORE_CALL_SECONDS)))
    return secure.SignedStore(store, kit, session) if kit else Checksummed(store)


class Watchdog(threading.Thread):
    """Beats every second in the store (a count that only grows; `beat`, a thread of its own on `beating`, its own
    connection, each beat tried once: a corrupted read cannot silence it) and watches the other parties' beats (on
    `store`, another): a party silent for `grace` seconds (killed, stopped, or its machine gone) or one that noted a
    failure stops this process with one line naming the party. A party that is alive but stuck is caught by the
    per-operation timeout. The process that started this one gone (the launcher killed, torchrun's agent lost), it
    stops too. A count that goes back or vanishes is the store tampered with, and so is a value that fails its
    signature (--key). A party's silence counts from when this one last reconnected (it could not see the beats
    before)."""

    def __init__(self, store, beating, rank, world_size, grace=GRACE_SECONDS):
        super().__init__(daemon=True)
        self.store, self.beating, self.rank, self.world_size, self.grace = store, beating, rank, world_size, grace
        self.stopped = threading.Event()
        self.parent = os.getppid()

    def stop(self):
        """Stop watching: its threads end at their next beat (one in a call to the store, which rank 0 is closing, is
        not waited for: it says nothing once stopped)."""
        self.stopped.set()

    def run(self):
        threading.Thread(target=self.beat, daemon=True).start()
        beats = {rank: (-1, time.monotonic()) for rank in range(self.world_size) if rank != self.rank}
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            if os.getppid() != self.parent:
                stop(self.rank, f"{party_name(self.rank)}: the process that started it is gone")
            try:
                self.look(beats)
            except secure.AuthenticationFailed as error:
                stop(self.rank, str(error))
            except Exception as error:  # (LostContact: no sound answer within the grace period): said, if it can be
                if not self.stopped.is_set():
                    message = f"{party_name(self.rank)}: {error if isinstance(error, LostContact) else one_line(error)}"
                    self.store.once("failed", message)
                    stop(self.rank, message)

    def look(self, beats):
        if self.store.check(["failed"]):
            stop(self.rank, self.store.get("failed").decode())
        for rank, (count, since) in list(beats.items()):
            self.watch(rank, count, max(since, self.store.reconnected), beats)

    def beat(self):
        beat = 0
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            beat += 1
            self.beating.once(f"alive/{self.rank}", str(beat))

    def watch(self, rank, count, since, beats):
        key, now = f"alive/{rank}", time.monotonic()
        if not self.store.check([key]):
            if count >= 0:
                raise secure.AuthenticationFailed(f"the rendezvous store was tampered with: {key!r} was deleted")
            latest = count
        else:
            latest = int(self.store.get(key))
        if latest < count:
            raise secure.AuthenticationFailed(f"the rendezvous store was tampered with: {key!r} went back")
        if latest != count:
            beats[rank] = (latest, now)
        elif now - since > self.grace and not (self.store.check([f"done/{rank}"])
                                               and self.store.get(f"done/{rank}") == b"1"):
            key = f"process/{rank}"  # (its own words, written when it joined)
            try:
                identity = json.loads(self.store.get(key)) if self.store.check([key]) else {}
            except ValueError:
                identity = {}
            message = f"{party_name(rank)} failed (silent for {now - since:.0f} s; {process_state(identity)})"
            self.store.set("failed", message)
            stop(self.rank, message)


def process_state(identity):
    """What the process that `identity` describes (a party's `process_identity()`) is doing, in words, as far as
    this machine can see: "its process 4242 is stopped" (or alive, or gone) on this machine; on another, where."""
    try:
        pid, host = int(identity["pid"]), str(identity["host"])[:64]
    except (TypeError, KeyError, ValueError):
        return "its process not known"
    if not identity.get("machine") or identity["machine"] != process_identity().get("machine"):
        return f"its process {pid} runs on {host}, out of this party's sight"
    try:
        fields = proc_stat(pid)
    except OSError:
        return f"its process {pid} is gone"
    if fields[19] != identity.get("start") or fields[0] in "ZXx":
        return f"its process {pid} is gone"
    return f"its process {pid} is {'stopped' if fields[0] in 'Tt' else 'alive'}"


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command's name: its state first (R, S, D, T, Z, ...), its start 19th."""
    with open(f"/proc/{pid}/stat") as file:
        return file.read().rsplit(")", 1)[1].split()


def process_identity():
    """This process, for the other parties' watchdogs: its host and pid, and (Linux) its machine (the boot and the
    pid namespace, where its pid means this process) and start (a pid used again is another process)."""
    identity = {"host": socket.gethostname(), "pid": os.getpid()}
    with contextlib.suppress(OSError, IndexError), open("/proc/sys/kernel/random/boot_id") as file:
        identity.update(machine=f"{file.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}",
                        start=proc_stat(os.getpid())[19])
    return identity


_stopping, _stopper = threading.Lock(), []  # (the thread on its way out)


def stop(rank, message, status=1):
    """Leave now, with one line and exit `status`; the server (host of the store) lingers so that the others can read
    why."""
    if not _stopping.acquire(blocking=False):
        if _stopper == [threading.get_ident()]:
            return  # a signal handler (SIGTERM, Ctrl-C) run while this thread lingers: it goes on leaving
        threading.Event().wait()  # the other thread is already on its way out
    _stopper.append(threading.get_ident())
    print(f"bench.py: error: {message}", file=sys.stderr, flush=True)
    writer.wait()  # a checkpoint being written is whole on the disk first: a restart can go on from it
    if rank == 0:
        time.sleep(3 * HEARTBEAT_SECONDS)
    os._exit(status)
