"""Every scheme as real processes on torch.distributed: one process per party, the tensors on the wire.

    python bench.py --distributed                   # every party on this machine, over loopback (launch.py)
    torchrun --nnodes 4 --node-rank R --nproc-per-node 1 --master-addr SERVER --master-port 29500 \\
        bench.py --distributed --data /my/site      # one party per machine (docs/distributed.md)

Rank 0 is the server and the aggregator (one process, two parties: no link runs between them) and hosts the
rendezvous store; rank k + 1 is client site k. Every process runs the same scheme loop, from the unchanged scheme
files, over the same deterministic schedule, with a `Transport` first among its run's hooks: at each
`run.send(source, destination, ...)` the source's process sends what the ledger counts and the destination's
receives it (`wire.Wire`), so sends and receives pair up by construction. The model parts and copies a process does
not hold, and the images of other sites, are meta-device stand-ins (`standins.StandIn`): the loop passes over them at
no cost, and each process computes only its own party's work, so clients that the schedule does not make wait for
each other work at once. Each party measures its busy time (its training time not spent waiting for a peer) and its
peak memory.

Evaluation (each round) is measurement, not part of the schemes' costs, and goes apart (`eval_bytes`): the run
deploys and scores in one place (`common.Run.deploy_and_score`), sending what crosses between the two sides of each
deployed model as evaluation traffic: each client runs the client side of its deployed model on its images and the
server the server side (for FedAvg the client holds all of it and sends its scores; for centralized training the
server does, and the client sends its images); the BatchNorm statistics pass of bn="local" goes the same way over
the training images; the loss of each round is summed at rank 0 and sent back (`Transport.summed`), so that all
processes stop together on a NaN. The parties keep in contact through the rendezvous store (contact.py): a party
that dies, stops or loses the store stops every process within `--grace` seconds, one that hangs within the
per-operation timeout, each with one line naming it.

With --save DIR each party writes its own checkpoint after every round (`checkpoints.Checkpoint`); started again (by
torchrun --max-restarts, or launch.py's own restarts, both counted in TORCHELASTIC_RESTART_COUNT), the parties agree
on the last round all of them have one of (`Transport.agree`) and go on from it.
"""
import contextlib
import copy
import ipaddress
import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import data
import secure
from checkpoints import leaves, one_line, tree_map
from common import LINKS, whole
from contact import GRACE_SECONDS, Checksummed, StoreContact, Watchdog, connected, process_identity, stop
from estimates import schedule_timeout
from profiler import resident_memory, restart_peak_memory
from secure import party_name
from standins import StandIn, adam_state, meta_copy, unwrap
from wire import Wire, placeholder

MAX_TIMEOUT = 7 * 24 * 3600  # --timeout at most a week: beyond, torch's timers overflow, and nothing waits that long


def rank_of(party):
    return party + 1 if isinstance(party, int) else 0


def placement(scheme):
    """Where each scheme's model lives: "client" (FedAvg: all of it), "server" (centralized) or "split"."""
    return {"central": "server", "fedavg": "client"}.get(scheme, "split")


class Transport:
    """Makes a run's sends real between the parties of a distributed run, one process each (`Wire`), and sums what
    every process counted; the schedule is the scheme loop's, the same in every process. A hook of the run: first
    among them, so that the others see what arrived (`sent`)."""

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
        restart_peak_memory()
        self.start_memory = resident_memory("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    # The run's hooks

    def stand_in(self, party, model):
        """A copy of `model` whose weights are on the meta device where this process is not `party` (rank 0 is the
        server and the aggregator); None where it is, for a real copy."""
        return meta_copy(model) if rank_of(party) != self.rank else None

    def started(self, run, state):
        for optimizer in state:  # the state split learning hands on exists in every process from the start
            if isinstance(optimizer, torch.optim.Optimizer):
                adam_state(optimizer)

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
        """At the end of a scheme: each site's deployed model, whole and real, where that site is, as a deployment
        has it: a split site receives the server's side of its model (evaluation traffic; none of a site's weights
        go to the server), centralized training's models stay at the server; None for the sites held elsewhere.
        Rank 0 gets the bytes every process sent and what each party measured of itself."""
        models = []
        for site, (client_side, server_side) in enumerate(run.deployed_sides):
            here = self.rank == (0 if client_side is None else rank_of(site))
            if client_side is not None and server_side is not None:  # a split: the server's side goes to the site
                if here:
                    server_side = unwrap(copy.deepcopy(server_side).to("meta")).to_empty(device=run.device)
                state = self.transfer("server", site, None, unwrap(server_side).state_dict())
                if here:
                    server_side.load_state_dict(state)
            models.append(whole(unwrap(client_side) if client_side is not None else None,
                                None if server_side is None else unwrap(server_side)) if here else None)
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
        """The end of a clean run: rank 0 (the store's host) goes last, and each party watches the others until then
        (a failure at the end still reaches it through the store, while rank 0 lingers)."""
        self.wire.settle()
        self.store.set(f"done/{self.rank}", "1")
        self.share(self._gather([0.0]) or [0.0])  # every party gets here, and rank 0 (the store's host) leaves last
        self.watchdog.stop()
        self.wire.settle()
        self.wire.channel.close()


def connect(timeout, device, kit=None, grace=GRACE_SECONDS):
    """Join the run as the party that RANK names (torchrun or `launch` set RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); rank 0 hosts the rendezvous store, unless torchrun's agent does. With a `kit`
    (`secure.load_kit`), the store's values are signed and the messages go sealed on a mesh of the parties'
    own (secure.py) instead of gloo's."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        hosted, listener = rendezvous_store(rank, world_size, timeout)  # (rank 0's store lives as long as this)
    except (RuntimeError, OSError) as error:  # (torch's DistNetworkError is a RuntimeError)
        raise ValueError(f"{party_name(rank)}: cannot listen at {where} for the rendezvous store ({one_line(error)})"
                         if rank == 0 else f"{party_name(rank)}: cannot reach the rendezvous store at {where} within "
                                           f"{timeout:g} s (is the server started, and its address right?)") from None
    # torchrun's store outlives a restart: each start of the parties keeps its keys apart ("failed" among them)
    prefix, session = f"start-{restart}/", None
    store = dist.PrefixStore(prefix, hosted)
    try:
        if kit:
            secure.same_federation(store, kit, world_size, timeout)  # a kit of another provisioning named at once
            session = secure.session_of(kit, store)
            store = secure.SignedStore(store, kit, session)
            store.set(f"alive/{rank}", "0")
            store.wait([f"alive/{peer}" for peer in range(world_size)])  # every party is here
        else:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout))
            store = Checksummed(store)
        # Every thread's store calls are short and survive a blip (`StoreContact`), each thread on a connection of
        # its own, so that none waits behind another's call (torchrun's agent's store makes no new ones: one).
        own = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        reconnect = (lambda: connected(where, prefix, kit, session)) if own else None
        contacts = [StoreContact(None if own else store, reconnect, grace, where, timeout) for _ in range(3)]
        store = contacts[0]
        store.set(f"process/{rank}", json.dumps(process_identity()))  # for the others' watchdogs to say what it does
        watchdog = Watchdog(*contacts[1:], rank, world_size, grace)
        watchdog.start()
        channel = secure.Mesh(secure.mesh(kit, store, os.environ["MASTER_ADDR"], timeout, session)) if kit else None
    except Exception as error:  # (the store gone, a peer not joining in time, a message failing authentication)
        if isinstance(error, secure.OtherFederation):  # (each party finds it out itself: nothing to tell)
            stop(rank, str(error), 2)
        message = str(error) if isinstance(error, secure.AuthenticationFailed) else f"{party_name(rank)}: {one_line(error)}"
        with contextlib.suppress(Exception):
            store.set("failed", message)
        stop(rank, message)
    transport = Transport(rank, world_size, store, timeout, device, channel)
    transport.restart, transport.hosted, transport.watchdog = restart, (hosted, listener), watchdog
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




def join(args, refuse, load_own_site):
    """This process as the party its environment names (RANK, under torchrun or launch.py), with the flags' settings:
    (its transport, connected; (train_sets, test_sets) as it holds them: its own site real, `load_own_site(site)`
    making or reading it, the others' shapes). A setting that cannot work: `refuse` one line."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        refuse(f"--distributed with RANK set is one party started by torchrun or by hand, and {', '.join(missing)} "
               f"{'is' if len(missing) == 1 else 'are'} not set (without RANK, bench.py starts every party itself)")
    try:
        rank, world_size, port = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "MASTER_PORT"))
        if not (world_size >= 2 and 0 <= rank < world_size and 0 < port < 65536):
            raise ValueError
    except ValueError:
        refuse(f"--distributed: RANK {os.environ['RANK']}, WORLD_SIZE {os.environ['WORLD_SIZE']}, MASTER_PORT "
               f"{os.environ['MASTER_PORT']}: a party's rank is 0 to WORLD_SIZE - 1 (at least 2 parties), a port 1 to "
               f"65535")
    master = os.environ["MASTER_ADDR"]
    if not (args.key or args.insecure) and not is_loopback(master):
        refuse(f"--distributed: MASTER_ADDR {master} is not a loopback address: --key (the kits of --provision) "
               f"authenticates and encrypts the parties' traffic (docs/distributed.md); --insecure runs it "
               f"unprotected, inside a network you trust (a VPN)")
    kit = None
    if args.key:
        try:
            kit = secure.load_kit(args.key, rank, world_size)
        except ValueError as error:
            refuse(str(error))
    try:
        transport = connect(args.timeout or 1800, args.device, kit, args.grace)
    except ValueError as error:
        refuse(str(error))
    try:
        sites = transport.sites(lambda: load_own_site(transport.rank - 1))
    except (ValueError, OSError) as error:
        stop(transport.rank, f"{party_name(transport.rank)}: {error}")
    transport.wire.timeout = args.timeout or schedule_timeout(args.cut, *sites)
    if transport.restart:  # started again (torchrun --max-restarts, or launch.py's): each party from its checkpoints
        args.resume = args.save
        if transport.rank == 0:
            print(f"restart {transport.restart}: " + (f"every party goes on from its checkpoints in {args.save}"
                                                      if args.save else "no --save DIR, so every scheme starts again"))
    return transport, sites


def add_flags(parser, positive):
    """bench.py's flags of real processes; `positive(kind, ...)` parses a positive number."""
    add = parser.add_argument_group("real processes", "every party its own process (docs/distributed.md)").add_argument
    add("--distributed", action="store_true", help="every party its own process on torch.distributed: spawned here over "
                                                   "loopback, or, started by torchrun, this process is one party")
    add("--max-restarts", type=positive(int, or_zero=True), default=0, metavar="N",
        help="--distributed spawned here: when a party fails, start every party again, up to N times, from their "
             "checkpoints (needs --save DIR)")
    add("--provision", metavar="DIR", help="write one kit per party of this federation into DIR (DIR/server, "
                                           "DIR/client-0, ...); nothing is trained (needs the [secure] extra)")
    add("--key", metavar="PATH", help="--distributed: every message authenticated and encrypted, and the store signed, "
                                      "with the kits of --provision (their folder, or under torchrun this party's own "
                                      "kit; default: gloo's plain TCP; needs the [secure] extra)")
    add("--insecure", action="store_true", help="--distributed across machines without --key: run although the traffic "
                                                "is neither authenticated nor encrypted, inside a network you trust")
    add("--grace", type=positive(float), default=GRACE_SECONDS, metavar="SECONDS",
        help=f"--distributed: how long a party may be silent (stopped, its machine gone), or out of contact with the "
             f"rendezvous store, before the run stops naming it (default: {GRACE_SECONDS:g})")
    add("--timeout", type=positive(float), metavar="SECONDS", help="--distributed: the longest a party waits for another "
                                                                   "(default: one round of all the parties' work at 5 "
                                                                   "GFLOP/s, plus a minute)")


def refused(args):
    """What the flags of real processes cannot go with, as (broken, why) for bench.py's checks, in one line each."""
    try:
        for flag, wanted in (("--provision", args.provision), ("--key", args.key)):
            if wanted:
                secure.require(flag)
        no_extra = None
    except ValueError as error:
        no_extra = str(error)
    return [(args.timeout and args.timeout > MAX_TIMEOUT,
             f"--timeout {args.timeout or 0:g}: at most {MAX_TIMEOUT} seconds (a week; a party silent longer has failed)"),
            (args.max_restarts and not (args.distributed and args.save),
             "--max-restarts starts the parties of a --distributed run again from their checkpoints: it needs "
             "--distributed and --save DIR"),
            (args.distributed and (args.costs_only or args.profile),
             "--distributed trains for real; it cannot go with --costs-only or --profile"),
            (args.key and not args.distributed, "--key authenticates the parties of a --distributed run; add --distributed"),
            (args.key and args.insecure, "--key protects the traffic, --insecure runs it unprotected: choose one"),
            (args.provision and (args.distributed or args.key),
             "--provision writes the kits and trains nothing; start the run with --distributed --key after"),
            (args.distributed and args.partition != "site",
             "--distributed: each client reads its own site; --partition iid/dirichlet pools them first"),
            (no_extra, no_extra)]
