"""Every scheme as real processes on torch.distributed: one process per party, the tensors on the wire.

    python bench.py --distributed                   # every party on this machine, over loopback
    torchrun --nnodes 4 --node-rank R --nproc-per-node 1 --master-addr SERVER --master-port 29500 \\
        bench.py --distributed --data /my/site      # one party per machine (docs/distributed.md)

Rank 0 is the server and the aggregator (one process, two parties: no link runs between them) and hosts the
rendezvous store; rank k + 1 is client site k. Every process runs the same scheme loop, from the unchanged
scheme files, over the same deterministic schedule, with a `Transport` among its run's observers: at each
`run.send(source, destination, ...)` the source's process sends what the ledger counts and the
destination's receives it, so sends and receives pair up by construction. The model parts and copies a
process does not hold (`Run.copies`), and the images of other sites, are meta-device stand-ins
(`common.StandIn`): the loop passes over them at no cost, and each process computes only its own
party's work, so clients that the schedule does not make wait for each other work at once. Each party
measures its busy time (its training time not spent waiting for a peer) and its peak memory.

On the wire (gloo, point-to-point, no pickle): per transfer a length, a header (per tensor: dtype, shape,
strides, offset) and one payload of the tensors' bytes in their own memory order, so the receiver rebuilds
them bit for bit, channels-last included. The payload bytes are the ledger's bytes (`wire_bytes`).

Evaluation (each round) is measurement, not part of the schemes' costs, and goes apart (`eval_bytes`): the
run deploys and scores in one place (`Run.deploy`, `Run.end_round`), sending what crosses between the two
sides of each deployed model as evaluation traffic: each client runs the client side of its deployed model
on its images and the server the server side (for FedAvg the client holds all of it and sends its scores;
for centralized training the server does, and the client sends its images); the BatchNorm statistics pass
of bn="local" goes the same way over the training images; the loss of each round is summed at rank 0 and
sent back (`Transport.summed`), so that all processes stop together on a NaN. A party that dies or hangs stops every process within a minute with one line naming it.

With --save DIR each party writes its own checkpoint after every round (`checkpoints.Checkpoint`); started again (by
torchrun --max-restarts, or `launch`'s own restarts, both counted in TORCHELASTIC_RESTART_COUNT), the parties
agree on the last round all of them have one of (`Transport.agree`) and go on from it.
"""
import contextlib
import copy
import ipaddress
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import data
import secure
from checkpoints import writer
from common import LINKS, Observer, StandIn, leaves, not_finite, one_line, training_flops, tree_map, unwrap, whole
from densenet_split import split_densenet121
from secure import party_name

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8,
          torch.bool)
HEARTBEAT_SECONDS, SILENT_SECONDS = 1.0, 20.0  # a party silent this long is taken for dead


class PartyFailed(Exception):
    """Another party died, hung or broke the protocol; the message names it."""


def rank_of(party):
    return party + 1 if isinstance(party, int) else 0


def placement(scheme):
    """Where each scheme's model lives: "client" (FedAvg: all of it), "server" (centralized) or "split"."""
    return {"central": "server", "fedavg": "client"}.get(scheme, "split")


def placeholder(tensor):
    """A tensor's shape and dtype on the meta device: what a process that does not hold it carries on with."""
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")


def memory_order(tensor):
    """The tensor's elements in the order they lie in memory (no copy for a dense tensor), and its strides."""
    order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))
    permuted = tensor.permute(order)
    if not permuted.is_contiguous():  # not dense (a strided view): send it as a standard contiguous tensor
        tensor = tensor.contiguous()
        return tensor.reshape(-1), tensor.stride()
    return permuted.reshape(-1), tensor.stride()


class Gloo:
    """The wire's messages as gloo's point-to-point sends: neither authenticated nor encrypted (`secure.Mesh`
    is, with the same calls)."""

    def isend(self, tensor, peer):
        return dist.isend(tensor, peer)

    def recv(self, buffer, peer, timeout):
        dist.irecv(buffer, peer).wait(timeout)
        return buffer

    def overhead(self, size):
        return 0

    def close(self):
        dist.barrier()
        dist.destroy_process_group()


class Wire:
    """Point-to-point messages between this process and its peers (no pickle): per transfer a length, a header
    (per tensor: dtype, shape, strides, offset) and one payload of the tensors' bytes in their own memory
    order, so that the receiver rebuilds them bit for bit; over gloo, or sealed on a mesh of the parties' own
    (`secure.Mesh`, with --key). It notes how long this process waits for a peer."""

    def __init__(self, rank, store, timeout, device, channel=None):
        self.rank, self.store, self.timeout, self.device = rank, store, timeout, device
        self.channel = channel or Gloo()
        self.waits = []  # (start, end) on the monotonic clock: waiting for a peer
        self.in_flight = []  # sends not yet complete: (peer, messages, their works)

    def fail(self, peer, error):
        """Name the party that failed first (another process may have noted it in the store) and stop. A
        message that failed authentication names no party: anyone on the network may have sent it."""
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        message = reason if isinstance(error, secure.AuthenticationFailed) else f"{party_name(peer)} failed ({reason})"
        with contextlib.suppress(Exception):
            if self.store.check(["failed"]):
                message = self.store.get("failed").decode()
            else:
                self.store.set("failed", message)
        raise PartyFailed(message)

    def send(self, peer, tensors):
        """Send `tensors` to `peer` without waiting for them to arrive; returns the payload's bytes and the
        framing's: the length and the header, and with --key a tag per MiB of each message (`secure.overhead`)."""
        flats = [memory_order(t.detach()) for t in tensors]
        by_size = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())  # aligned offsets
        offsets, offset = [0] * len(tensors), 0
        for i in by_size:
            offsets[i] = offset
            offset += tensors[i].numel() * tensors[i].element_size()
        header = [len(tensors)]
        for t, (_, stride), start in zip(tensors, flats, offsets):
            header += [DTYPES.index(t.dtype), t.dim(), *t.shape, *stride, start]
        payload = torch.cat([torch.empty(0, dtype=torch.uint8)] + [flats[i][0].cpu().view(torch.uint8) for i in by_size])
        messages = [message for message in (torch.tensor([len(header)]), torch.tensor(header), payload) if len(message)]
        try:
            self.in_flight.append((peer, messages, [self.channel.isend(message, peer) for message in messages]))
        except Exception as error:
            self.fail(peer, error)
        self.settle(wait=False)
        return len(payload), 8 + 8 * len(header) + sum(self.channel.overhead(m.numel() * m.element_size()) for m in messages)

    def settle(self, wait=True):
        """Complete this process's sends in flight (wait=True), or let go of those already done. A party does
        not wait for what it sends to arrive, only for what it receives: a server streams one client's
        gradients while it serves the next, each on its own line. Every round's sends settle before the
        round's clock stops (`Transport.round_ending`)."""
        started, unsettled = time.perf_counter(), []
        for peer, messages, works in self.in_flight:
            try:
                if wait:
                    for work in works:
                        work.wait(timedelta(seconds=self.timeout))
                elif not all(work.is_completed() for work in works):
                    unsettled.append((peer, messages, works))
            except Exception as error:
                self.fail(peer, error)
        self.in_flight = unsettled
        if wait:
            self.waits.append((started, time.perf_counter()))

    def _recv(self, buffer, peer):
        started = time.perf_counter()
        self.channel.recv(buffer, peer, timedelta(seconds=self.timeout))
        self.waits.append((started, time.perf_counter()))
        return buffer

    def receive(self, peer, given, finite_on=None):
        """Receive tensors shaped like `given`: into them where they are real, into new ones where not. Nothing
        the peer declares is believed: the header's length, each tensor's dtype and shape, its strides and its
        place in the payload are compared with what the schedule expects (`given`) before the payload is
        allocated; a header that differs stops the run naming the sender. `finite_on`: the link whose values
        must be finite, checked in the payload before they go anywhere (no GPU sync); None: not checked."""
        expected = 1 + sum(3 + 2 * target.dim() for target in given)
        try:
            length = int(self._recv(torch.empty(1, dtype=torch.int64), peer))
            if length != expected:
                raise PartyFailed(f"protocol error: {party_name(peer)} sent a header of {length} numbers, "
                                  f"{party_name(self.rank)} expected {expected}")
            header = self._recv(torch.empty(expected, dtype=torch.int64), peer).tolist()
            if header[0] != len(given):
                raise PartyFailed(f"protocol error: {party_name(peer)} sent {header[0]} tensors, "
                                  f"{party_name(self.rank)} expected {len(given)}")
            entries, at = [], 1
            total = sum(target.numel() * target.element_size() for target in given)
            for target in given:
                index, ndim = header[at], header[at + 1]
                dtype = DTYPES[index] if 0 <= index < len(DTYPES) else None
                shape, stride = header[at + 2:at + 2 + ndim], header[at + 2 + ndim:at + 2 + 2 * ndim]
                start = header[at + 2 + 2 * ndim]
                if dtype != target.dtype or ndim != target.dim() or tuple(shape) != tuple(target.shape):
                    raise PartyFailed(f"protocol error: {party_name(peer)} sent {dtype or 'an unknown dtype'} "
                                      f"{tuple(shape)} where {party_name(self.rank)} expected {target.dtype} "
                                      f"{tuple(target.shape)}")
                size = target.numel() * target.element_size()
                reach = sum((n - 1) * step for n, step in zip(shape, stride)) + 1 if target.numel() else 0
                if (min(stride, default=0) < 0 or start < 0 or start % target.element_size() or start + size > total
                        or reach > target.numel()):
                    raise PartyFailed(f"protocol error: {party_name(peer)} sent a tensor that does not fit its "
                                      f"place in the message (strides {stride}, offset {start})")
                entries.append((stride, start))
                at += 3 + 2 * ndim
            payload = self._recv(torch.empty(total, dtype=torch.uint8), peer) if total else torch.empty(0, dtype=torch.uint8)
        except PartyFailed:
            raise
        except Exception as error:
            self.fail(peer, error)
        arrived = [payload[start:start + target.numel() * target.element_size()].view(target.dtype)
                   .as_strided(target.shape, stride) for target, (stride, start) in zip(given, entries)]
        if finite_on and not_finite(arrived):
            self.fail(peer, f"sent values that are not finite on {finite_on}, refused by {party_name(self.rank)}")
        received = []
        for target, tensor in zip(given, arrived):
            if target.is_meta:
                received.append(tensor.to(self.device, non_blocking=True))
            else:
                with torch.no_grad():
                    target.copy_(tensor)
                received.append(target)
        return received


class Transport(Observer):
    """Makes a run's sends real between the parties of a distributed run, one process each (`Wire`), and sums
    what every process counted; the schedule is the scheme loop's, the same in every process."""

    def __init__(self, rank, world_size, store, timeout, device, channel=None):
        self.rank, self.world_size, self.store = rank, world_size, store
        self.device = torch.device(device)
        self.wire = Wire(rank, store, timeout, self.device, channel)
        self.scheme, self.num_finished = None, 0
        self.restart = 0  # how many times the parties were started again (torchrun's restart count)
        self.wire_bytes = dict.fromkeys(LINKS, 0)  # payload bytes this process sent, per link
        self.eval_bytes = 0  # payload bytes of evaluation and collection this process sent
        self.framing_bytes = 0  # what the ledger's transfers this process sent took beyond their payloads
        self.busy, self.round_start = [], None  # (start, end) on the monotonic clock: this party working
        self.epoch = time.time() - time.perf_counter()  # monotonic to wall-clock time, to compare parties

    def begin(self, scheme):
        """A scheme starts: note it, and start measuring this party's busy time and peak memory afresh."""
        self.scheme, self.wire.waits, self.busy = scheme, [], []
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # Linux: the peak resident memory starts again from what is resident now
        self.start_memory = resident_memory("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    # The run's observer

    def holds(self, party):
        """Whether this process is `party` (rank 0 is the server and the aggregator)."""
        return rank_of(party) == self.rank

    def sent(self, run, source, destination, link, objects):
        return self.transfer(source, destination, link, objects)

    def summed(self, run, values):
        total = self._gather([float(value) for value in values])
        return self.share(total if self.rank == 0 else [0.0] * len(values))

    def round_started(self, run):
        self.round_start = time.perf_counter()

    def round_ending(self, run):
        """The round ends when what it sent has arrived; this party was busy during it, except while it waited."""
        self.wire.settle()
        end, at = time.perf_counter(), self.round_start
        for wait_start, wait_end in self.wire.waits:
            if self.round_start < wait_end and wait_start < end:
                if wait_start > at:
                    self.busy.append((at, wait_start))
                at = max(at, wait_end)
        if end > at:
            self.busy.append((at, end))
        self.wire.waits = []

    def finished(self, run, result):
        """At the end of a scheme: rank 0 gets each site's deployed model, whole and real (the client sides come
        from the clients), the bytes every process sent and what each party measured of itself."""
        models = []
        for site, (client_side, server_side) in enumerate(run.deployed_sides):
            if client_side is not None:
                if self.rank == 0:
                    client_side = unwrap(copy.deepcopy(client_side).to("meta")).to_empty(device=run.device)
                state = self.transfer(site, "server", None, client_side.state_dict())
                if self.rank == 0:
                    client_side.load_state_dict(state)
            if self.rank == 0:
                models.append(whole(client_side, None if server_side is None else unwrap(server_side)))
        self.wire.settle()
        result.update(self.measured(), models=models)

    def transfer(self, source, destination, link, objects):
        """`objects` from `source` to `destination` (`link` None: evaluation traffic, not in the ledger), as the
        destination holds them: received into the given tensors where they are real (a state dict lands in its
        model), into new ones where they are placeholders; every other process gets placeholders."""
        source, destination = rank_of(source), rank_of(destination)
        if source == destination:  # the server and the aggregator share rank 0
            return objects
        if self.rank == source:
            sent, framing = self.wire.send(destination, leaves(objects))
            if link is None:
                self.eval_bytes += sent
            else:
                self.wire_bytes[link] += sent
                self.framing_bytes += framing
        elif self.rank == destination:
            # What arrives is finite, or the run stops naming the sender; an upload for averaging is the
            # averaging's to check and leave out (`common.accepted`), and the run goes on without it.
            received = iter(self.wire.receive(source, leaves(objects),
                                              finite_on=None if link == "client->aggregator" else link or "evaluation"))
            return tree_map(lambda _: next(received), objects)
        return tree_map(placeholder, objects)

    def measured(self):
        """Rank 0: the bytes every process sent, and each party's busy time and memory (through the store)."""
        key = f"party/{self.num_finished}/{{}}"
        self.num_finished += 1
        self.store.set(key.format(self.rank), json.dumps(dict(
            busy=[(start + self.epoch, end + self.epoch) for start, end in self.busy],
            peak_memory=max(resident_memory(), self.start_memory),  # (Linux updates its peak lazily: never below)
            start_memory=self.start_memory,
            peak_gpu_memory=torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None)))
        wire = self._gather([self.wire_bytes[link] for link in LINKS] + [self.eval_bytes, self.framing_bytes])
        self.wire_bytes, self.eval_bytes, self.framing_bytes = dict.fromkeys(LINKS, 0), 0, 0
        if self.rank != 0:
            return {}
        parties = {party_name(rank): json.loads(self.store.get(key.format(rank))) for rank in range(self.world_size)}
        busy = {party: measured.pop("busy") for party, measured in parties.items()}
        return dict(wire_bytes=dict(zip(LINKS, map(int, wire[:-2]))), eval_bytes=int(wire[-2]), framing_bytes=int(wire[-1]),
                    busy_seconds={party: sum(end - start for start, end in spans) for party, spans in busy.items()},
                    overlap_seconds=overlap(list(busy.values())),
                    **{what: {party: measured[what] for party, measured in parties.items()}
                       for what in ("start_memory", "peak_memory", "peak_gpu_memory") if parties["server"][what] is not None})

    # What a process holds

    def parts(self, client_model, server_model, image_shape):
        """The scheme's two model parts as this process holds them: its own real, the others' meta stand-ins."""
        where = placement(self.scheme)
        client_here = (where != "server") if self.rank > 0 else (where == "server")
        server_here = (where == "client") if self.rank > 0 else (where != "client")
        client = StandIn(client_model if client_here else client_model.to("meta"), image_shape)
        server = StandIn(server_model if server_here else server_model.to("meta"), client.output_shape)
        return client, server

    # Sums, agreement and checkpoints across the processes

    def _gather(self, values):
        """Rank 0 gets every process's float64 `values` (a list), summed; the others get None."""
        values = torch.tensor(values, dtype=torch.float64)
        for rank in range(1, self.world_size):
            if self.rank == rank:
                self.wire.send(0, [values])
            elif self.rank == 0:
                values += self.wire.receive(rank, [torch.zeros_like(values)])[0]
        return values.tolist() if self.rank == 0 else None

    def share(self, values):
        """Rank 0's float64 `values` (a list) to every process."""
        values = torch.tensor(values if self.rank == 0 else [0.0] * len(values), dtype=torch.float64)
        for rank in range(1, self.world_size):
            if self.rank == 0:
                self.wire.send(rank, [values])
            elif self.rank == rank:
                values = self.wire.receive(0, [values])[0]
        return values.tolist()

    def agree(self, found, rounds):
        """The last round (of `rounds`) every party has a checkpoint of, 0 if none: `found` holds the rounds
        done of this party's checkpoints."""
        held = self._gather([1.0 if done == 0 or done in found else 0.0 for done in range(rounds + 1)])
        agreed = max(done for done, count in enumerate(held) if count == self.world_size) if self.rank == 0 else 0
        return int(self.share([agreed])[0])

    def state_dict(self):
        """What a checkpoint keeps of this party's transport: the bytes it sent and its busy time (on the wall
        clock, which outlives the process)."""
        return dict(wire_bytes=self.wire_bytes, eval_bytes=self.eval_bytes, framing_bytes=self.framing_bytes,
                    busy=[[start + self.epoch, end + self.epoch] for start, end in self.busy])

    def load_state_dict(self, state):
        self.wire_bytes, self.eval_bytes = dict(state["wire_bytes"]), state["eval_bytes"]
        self.framing_bytes = state["framing_bytes"]
        self.busy = [(start - self.epoch, end - self.epoch) for start, end in state["busy"]] + self.busy

    # Setup

    def sites(self, load_own_site):
        """(train_sets, test_sets) as this process holds them: its own site real (`load_own_site()` returns
        its (train, test) sets), every other site shape-only, of the sizes its client reports."""
        own = load_own_site() if self.rank > 0 else None
        table = [0.0] * 5 * (self.world_size - 1)  # per site: training images, test images, image shape
        for rank in range(1, self.world_size):
            if self.rank == rank:
                self.wire.send(0, [torch.tensor([len(own[0]), len(own[1]), *own[0].images.shape[1:]])])
            elif self.rank == 0:
                table[5 * rank - 5:5 * rank] = self.wire.receive(rank, [torch.zeros(5, dtype=torch.int64)])[0].tolist()
        table = self.share(table)
        train_sets, test_sets = [], []
        for site in range(self.world_size - 1):
            if site == self.rank - 1:
                train_sets.append(own[0])
                test_sets.append(own[1])
                continue
            num_train, num_test, *image_shape = map(int, table[5 * site:5 * site + 5])
            for sets, size in ((train_sets, num_train), (test_sets, num_test)):
                sets.append(data.Site(torch.empty(size, *image_shape, device="meta"), torch.empty(size, device="meta"),
                                      f"site-{site}"))
        return train_sets, test_sets

    def fail(self, message):
        """This party cannot go on: tell the others (their watchdogs read the store every second) and leave
        with one line."""
        with contextlib.suppress(Exception):
            self.store.set("failed", message)
        stop(self.rank, message)

    def close(self):
        """The end of a clean run: stop watching, and let rank 0 (the store's host) go last."""
        self.wire.settle()
        self.watchdog.stop()
        self.store.set(f"done/{self.rank}", "1")
        self.share(self._gather([0.0]) or [0.0])  # every party gets here, and rank 0 (the store's host) leaves last
        self.wire.settle()
        self.wire.channel.close()


class Watchdog(threading.Thread):
    """Beats every second in the store (a count that only grows) and watches the other parties' beats: a party
    silent for `SILENT_SECONDS` (killed, or its machine gone) or one that noted a failure stops this process
    with one line naming the party. A party that is alive but stuck is caught by the per-operation timeout. The
    process that started this one gone (the launcher killed, torchrun's agent lost), it stops too. A count that
    goes back or vanishes is the store tampered with, and so is a value that fails its signature (--key)."""

    def __init__(self, store, rank, world_size):
        super().__init__(daemon=True)
        self.store, self.rank, self.world_size = store, rank, world_size
        self.stopped = threading.Event()
        self.parent = os.getppid()

    def stop(self):
        self.stopped.set()
        self.join()

    def run(self):
        beats = {rank: (-1, time.monotonic()) for rank in range(self.world_size) if rank != self.rank}
        beat = 0
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            if os.getppid() != self.parent:
                stop(self.rank, f"{party_name(self.rank)}: the process that started it is gone")
            try:
                beat += 1
                self.store.set(f"alive/{self.rank}", str(beat))
                if self.store.check(["failed"]):
                    stop(self.rank, self.store.get("failed").decode())
                for rank, (count, since) in beats.items():
                    self.watch(rank, count, since, beats)
            except secure.AuthenticationFailed as error:
                stop(self.rank, str(error))
            except Exception:  # the store is gone: its host, the server, is
                if not self.stopped.is_set():
                    stop(self.rank, "server failed (its rendezvous store is gone)")

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
        elif now - since > SILENT_SECONDS and not (self.store.check([f"done/{rank}"])
                                                   and self.store.get(f"done/{rank}") == b"1"):
            message = f"{party_name(rank)} failed (silent for {SILENT_SECONDS:.0f} s)"
            self.store.set("failed", message)
            stop(self.rank, message)


_stopping, _stopper = threading.Lock(), []  # (the thread on its way out)


def stop(rank, message):
    """Leave now, with one line; the server (host of the store) lingers so that the others can read why."""
    if not _stopping.acquire(blocking=False):
        if _stopper == [threading.get_ident()]:
            return  # a signal handler (SIGTERM, Ctrl-C) run while this thread lingers: it goes on leaving
        threading.Event().wait()  # the other thread is already on its way out
    _stopper.append(threading.get_ident())
    print(f"bench.py: error: {message}", file=sys.stderr, flush=True)
    writer.wait()  # a checkpoint being written is whole on the disk first: a restart can go on from it
    if rank == 0:
        time.sleep(3 * HEARTBEAT_SECONDS)
    os._exit(1)


def connect(timeout, device, kit=None):
    """Join the run as the party that RANK names (torchrun or `launch` set RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); rank 0 hosts the rendezvous store, unless torchrun's agent does. With a `kit`
    (`secure.load_kit`), the store's values are signed and the messages go sealed on a mesh of the parties'
    own (secure.py) instead of gloo's."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    store, listener = rendezvous_store(rank, world_size, timeout)
    # torchrun's store outlives a restart: each start of the parties keeps its keys apart ("failed" among them)
    store = dist.PrefixStore(f"start-{restart}/", store)
    try:
        if kit:
            store = secure.SignedStore(store, kit, secure.session_of(kit, store))
            store.set(f"alive/{rank}", "0")
            store.wait([f"alive/{peer}" for peer in range(world_size)])  # every party is here
        else:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout))
        watchdog = Watchdog(store, rank, world_size)
        watchdog.start()
        channel = secure.Mesh(secure.mesh(kit, store, os.environ["MASTER_ADDR"], timeout)) if kit else None
    except Exception as error:  # (the store gone, a peer not joining in time, a message failing authentication)
        message = str(error) if isinstance(error, secure.AuthenticationFailed) else f"{party_name(rank)}: {one_line(error)}"
        with contextlib.suppress(Exception):
            store.set("failed", message)
        stop(rank, message)
    transport = Transport(rank, world_size, store, timeout, device, channel)
    transport.restart, transport.listener, transport.watchdog = restart, listener, watchdog
    # Any exception nothing caught (an out-of-memory, Ctrl-C), here or in another party, stops every party.
    sys.excepthook = lambda kind, error, trace: transport.fail(f"{party_name(rank)}: {one_line(error)}")
    signal.signal(signal.SIGTERM, lambda *_: transport.fail(f"{party_name(rank)} was stopped (SIGTERM)"))
    return transport


def rendezvous_store(rank, world_size, timeout):
    """(the run's rendezvous store, the socket it listens on or None): rank 0 hosts it on MASTER_ADDR's address
    alone (torch's own store listens on every interface), the others connect to it; under torchrun, the store
    of torchrun's agent (which listens as torchrun does)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return next(dist.rendezvous("env://", rank, world_size, timeout=timedelta(seconds=timeout)))[0], None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    listener = None
    if rank == 0:
        address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.create_server(address[4][:2], family=address[0], backlog=max(128, world_size))
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timedelta(seconds=timeout),
                          master_listen_fd=listener.fileno() if listener else None)
    return store, listener


def is_loopback(host):
    """Whether `host` (a name or an address) is this machine's loopback: traffic to it never leaves the machine."""
    try:
        return all(ipaddress.ip_address(found[4][0]).is_loopback for found in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def schedule_timeout(cut, train_sets, test_sets):
    """The longest a party may wait for another, generously: one round of every party's work (training,
    and for bn="local" the statistics pass and scoring: about 1.5 times the training FLOPs) at 5 GFLOP/s,
    plus a minute."""
    with torch.device("meta"):
        model = nn.Sequential(*split_densenet121(cut))
    per_image = training_flops(model, tuple(train_sets[0].images.shape[1:]))
    images = sum(len(s) for s in train_sets) + sum(len(s) for s in test_sets)
    return 60 + 1.5 * per_image * images / 5e9


def overlap(intervals):
    """How long at least two parties were busy at once (a client computing while the server serves another,
    say); `intervals`: per party, its (start, end) busy intervals, disjoint."""
    events = sorted(event for spans in intervals for start, end in spans for event in ((start, 1), (end, -1)))
    total, busy, last = 0.0, 0, None
    for moment, change in events:
        if busy >= 2:
            total += moment - last
        busy, last = busy + change, moment
    return total


def resident_memory(field="VmHWM"):
    """This process's resident memory in bytes: its peak since `Transport.begin` ("VmHWM"), or now ("VmRSS").
    Linux; elsewhere the peak since the process started."""
    try:
        with open("/proc/self/status") as file:
            return next(int(line.split()[1]) * 1024 for line in file if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(argv, num_parties, threads, rows_path, max_restarts=0):
    """Run `bench.py argv` as `num_parties` processes on this machine over loopback, `threads` threads each.
    Rank 0 prints the table and writes the rows to `rows_path`. When a party fails, the others are ended and,
    up to `max_restarts` times, all of them start again (as torchrun --max-restarts does: they resume from
    their checkpoints). Returns the exit status: 0, or 1 after one line naming the party that failed."""
    for restart in range(max_restarts + 1):
        failure = start_parties(argv, num_parties, threads, rows_path, restart)
        if failure is None:
            return 0
        if restart < max_restarts:
            print(f"bench.py: {failure}; starting every party again ({restart + 1} of {max_restarts} restarts)",
                  file=sys.stderr, flush=True)
    print(f"bench.py: error: {failure}", file=sys.stderr, flush=True)
    return 1


def start_parties(argv, num_parties, threads, rows_path, restart):
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
                process = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "bench.py"),
                                            *argv, "--json", rows_path], env=env, stderr=errors,
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
        said = [line.strip().removeprefix("bench.py: error: ") for line in parties[first][1]
                if line.startswith("bench.py: error:")]
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
