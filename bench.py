"""Train every scheme on the same federation and print one comparison table.

    python bench.py                                  # the synthetic federation, all seven schemes, CPU or GPU
    python bench.py --costs-only --image-size 224    # bytes and FLOPs at the paper's scale, no training
    python bench.py --distributed                    # every party its own process, the tensors on the wire
    python bench.py --attack --cuts-sweep            # what the server can learn, at the cut and at every cut
    python bench.py --tradeoff --attack              # how much privacy each defense buys, and at what price

Each row: AUROC (pooled with its 95% interval, and per site), accuracy, bytes on every link, FLOPs per party,
wall time and its ratio to centralized training, an estimated deployment time (see `deployment_seconds`),
whether labels leave the sites and how much of the images the activations still carry (`privacy`).
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.optim.optimizer as optimizer_hooks
from torch import nn

import checkpoints
import data
import distributed
import fedlearn
import privacy
import report
import secure
import splitfed
import splitlearn
from checkpoints import Checkpoint
from common import BN_SETTINGS, ORDERS, Observer, cost_only, one_line
from densenet_split import CUTS, label_private, load_site_model, split_densenet121

SCHEMES = {
    "central": lambda client, server, *sets, **cfg: fedlearn.centralized(nn.Sequential(client, server), *sets, **cfg),
    "fedavg": lambda client, server, *sets, **cfg: fedlearn.train(nn.Sequential(client, server), *sets, **cfg),
    "sl-client": lambda *parts_and_sets, **cfg: splitlearn.train(*parts_and_sets, turns="client", **cfg),
    "sl-batch": lambda *parts_and_sets, **cfg: splitlearn.train(*parts_and_sets, turns="batch", **cfg),
    "sfv1": lambda *parts_and_sets, **cfg: splitfed.train(*parts_and_sets, version=1, **cfg),
    "sfv2": lambda *parts_and_sets, **cfg: splitfed.train(*parts_and_sets, version=2, **cfg),
    "sfv3": lambda *parts_and_sets, **cfg: splitfed.train(*parts_and_sets, version=3, **cfg),
}
MAX_ROUNDS = 1000
SPLIT_SCHEMES = ("sl-client", "sl-batch", "sfv1", "sfv2", "sfv3")
UPLOADING = ("fedavg", "sfv1", "sfv2")  # the schemes whose clients upload weights for averaging
SENDS = {"central": "images", "fedavg": "weights"}  # what leaves a site; the split schemes send activations
LADDER = dict(nopeek=(0.1, 0.3, 1, 3), noise=(0.1, 0.3, 1), gradient_noise=(0.1, 0.3, 1), dp=(0, 0.0001, 0.001, 0.01, 1))
APPLIES = dict(nopeek=SPLIT_SCHEMES, noise=SPLIT_SCHEMES, gradient_noise=SPLIT_SCHEMES, dp=UPLOADING)  # who defends with what


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad input: one line, exit status 2, no usage dump."""
        self.exit(2, f"bench.py: error: {message}\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        """Append "(default: ...)" unless the help already says what the default is, or there is none to say
        (a switch that is off, an output not written)."""
        if "default" in (action.help or "") or action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


def positive(kind, or_zero=False, or_infinite=False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        finite = math.isfinite(value) or (or_infinite and value == math.inf)
        if not (value >= 0 if or_zero else value > 0) or (kind is float and not finite):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'zero or ' if or_zero else ''}positive")
        return value
    return parse


def scheme_list(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCHEMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scheme {','.join(unknown) or text!r}; choose from {','.join(SCHEMES)}")
    return names


def defense(text):
    """NAME:STRENGTH, e.g. nopeek:0.3, as (attribute of privacy.Defense, strength)."""
    name, _, strength = text.partition(":")
    if name not in privacy.Defense.NAMES:
        raise argparse.ArgumentTypeError(f"unknown defense {name!r} in {text!r}; choose from "
                                         f"{', '.join(privacy.Defense.NAMES)}")
    return name.replace("-", "_"), positive(float, or_zero=True)(strength)


def size_list(text):
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if min(sizes) < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: every site needs at least 8 images")
    return sizes


def poison(text):
    """SITE:nan or SITE:SCALE, e.g. 1:1e4, as (site, what its uploads become)."""
    site, _, how = text.partition(":")
    try:
        site, scale = int(site), float(how)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SITE:nan or SITE:SCALE (e.g. 1:1e4)") from None
    if site < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: sites are numbered from 0")
    return site, scale


def parse_args(argv):
    parser = Parser(description="Train every scheme on one federation and compare AUROC, bytes, FLOPs and time.",
                    formatter_class=Formatter)
    federation = parser.add_argument_group("data", "the federation: synthetic (default) or X-ray folders")
    federation.add_argument("--data", metavar="PATH", default=None,
                        help="X-ray folder or CSV manifest (docs/data.md); default: the synthetic federation")
    federation.add_argument("--sites", type=positive(int), default=None,
                        help="number of sites (default: 3 synthetic, or the folder's own sites)")
    federation.add_argument("--site-sizes", type=size_list, default=None, metavar="N,N,...",
                        help=f"synthetic images per site, train and test (default: {','.join(map(str, data.SITE_SIZES))}, then 96)")
    federation.add_argument("--same-scanner", action="store_true",
                        help="synthetic sites all acquire with one scanner (data.SHARED_SCANNER): they then differ "
                             "in size and prevalence only (default: each its own contrast, gamma, noise and blur)")
    federation.add_argument("--partition", choices=("site", "iid", "dirichlet"), default="site",
                        help="--data: keep its sites, or pool and split into --sites")
    federation.add_argument("--image-size", type=positive(int), default=48, metavar="PX", help="image side in pixels")
    training = parser.add_argument_group("training", "what trains, and how")
    training.add_argument("--schemes", type=scheme_list, default=None, metavar="LIST",
                        help="comma-separated schemes to run (default: all; the split schemes with --defense; "
                             "sl-client with --tradeoff)")
    training.add_argument("--rounds", type=positive(int), default=5, help="rounds (each: every training image once)")
    training.add_argument("--cut", choices=CUTS, default="transition1", metavar="NAME",
                        help=f"split point, one of {', '.join(CUTS)}")
    training.add_argument("--bn", choices=BN_SETTINGS, default="local",
                        help="BatchNorm statistics of the deployed models: local (recomputed at each site on its own "
                             "training images) or averaged (as training and averaging left them)")
    training.add_argument("--batch-size", type=positive(int), default=32, help="mini-batch size")
    training.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate")
    training.add_argument("--order", choices=ORDERS, default="fixed",
                        help="the order of split learning's and SplitFed v2's client turns: fixed (site order "
                             "every round, as the paper did) or shuffled (a seeded order drawn each round)")
    training.add_argument("--seeds", type=positive(int), default=1, help="seeds 0..N-1; mean ± std over seeds")
    training.add_argument("--label-private", action="store_true",
                        help="split schemes keep the classifier head and the loss at the client (U-shaped): "
                             "labels never leave a site")
    training.add_argument("--defense", type=defense, action="append", default=[], metavar="NAME:STRENGTH",
                        help="a client-side defense, several allowed: for the split schemes nopeek:ALPHA (loss + ALPHA x "
                             "dCor² of images and activations), noise:SIGMA (Gaussian noise of SIGMA x the "
                             "activations' std on what is sent), gradient-noise:SIGMA (the same on the gradients "
                             "a --label-private client returns); for fedavg, sfv1 and sfv2 dp:SIGMA (each client's "
                             "update clipped to --clip, plus Gaussian noise of SIGMA x --clip: client-level "
                             "differential privacy, ε reported at --delta); default: none")
    training.add_argument("--clip", type=positive(float, or_infinite=True), default=50.0, metavar="NORM",
                        help="--defense dp: the L2 norm each client's update is clipped to (inf: unbounded; 50 clips "
                             "only the first rounds' largest updates on the default federation)")
    training.add_argument("--delta", type=positive(float), default=1e-5, metavar="D",
                        help="--defense dp: the δ at which ε is reported")
    training.add_argument("--max-update-ratio", type=positive(float, or_infinite=True), default=10.0, metavar="X",
                          help="averaging leaves out an upload farther from the round's median upload than X times "
                               "the median distance (with 3 sites or more), and any that is not finite; inf: only "
                               "those (docs/distributed.md)")
    training.add_argument("--poison", type=poison, action="append", default=[], metavar="SITE:nan|SITE:SCALE",
                          help="test the averaging's checks: client SITE's uploads for averaging carry a NaN, or "
                               "are multiplied by SCALE (repeat for other clients)")
    training.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available, else cpu")
    training.add_argument("--bf16", action="store_true",
                        help="bf16 autocast: halves activation bytes; on a GPU faster only at large batches (docs/gpu.md)")
    training.add_argument("--layout", choices=("channels-last", "contiguous"), default="channels-last",
                        help="memory layout of images, activations and convolution weights (channels-last is "
                             "faster on this project's CPU and on GPUs; the numbers differ in the last bits)")
    training.add_argument("--deterministic", action="store_true",
                        help="the same seed gives the same models on a GPU too: deterministic kernels, no cuDNN "
                             "autotuning (no measurable cost at batch 32 on an H200, docs/gpu.md; a CPU run is "
                             "reproducible without it)")
    training.add_argument("--threads", type=positive(int), default=None, metavar="N",
                        help="threads per process (default: torch's; with --distributed spawned here, the cores "
                             "shared among the processes)")
    measuring = parser.add_argument_group("what to measure", "besides AUROC, bytes, FLOPs and time")
    measuring.add_argument("--attack", action="store_true",
                        help="also run a reconstruction attack on each split scheme's activations after every round (a "
                             "decoder trained on another site's images; at 1000 steps about a minute a round at 48 px "
                             "on 2 CPU cores)")
    measuring.add_argument("--attack-steps", type=positive(int), default=1000, metavar="N",
                        help="the reconstruction attack's decoder training steps (the inversion of FedAvg's update in "
                             "round 1: a fifth as many)")
    measuring.add_argument("--inversion-curve", action="store_true",
                        help="instead of training the schemes: FedAvg's aggregator inverts one client's update after 1 "
                             "local step on 1, 4 and 8 of site 0's images, then 2 and 8 steps on 8 (--attack-steps "
                             "steps each; one image trains only from --image-size 64)")
    measuring.add_argument("--tradeoff", action="store_true",
                        help="train each scheme (default sl-client and fedavg) undefended and at a ladder of strengths "
                             "per defense that applies to it (nopeek 0.1,0.3,1,3; noise 0.1,0.3,1; gradient-noise "
                             "0.1,0.3,1 with --label-private; dp 0,0.0001,0.001,0.01,1 at --clip; or the --defense "
                             "points given) and print privacy against AUROC")
    measuring.add_argument("--cuts-sweep", action="store_true",
                        help="after the run, the server's view at every cut of one trained model (the first of "
                             "central and the split schemes to run): dCor², and with --attack the reconstruction")
    measuring.add_argument("--costs-only", action="store_true",
                        help="count bytes and FLOPs without training (the same loops, model parts that do no arithmetic)")
    measuring.add_argument("--profile", action="store_true",
                        help="also print, per scheme, training images per second, the shares of time in forward, "
                             "backward, optimizer and transfers, and peak memory (synchronises the GPU at every step)")
    measuring.add_argument("--bandwidth", type=positive(float), default=100.0, metavar="MBIT",
                        help="deployment estimate: each link's bandwidth in Mbit/s")
    measuring.add_argument("--latency", type=positive(float, or_zero=True), default=20.0, metavar="MS",
                        help="deployment estimate: round-trip time between any two parties in ms (20: a hospital "
                             "and a cloud server in the same region; 0.5: one LAN); every transfer waits half of it")
    measuring.add_argument("--client-tflops", type=positive(float), default=5.0, metavar="X",
                        help="deployment estimate: a client's sustained TFLOP/s")
    measuring.add_argument("--server-tflops", type=positive(float), default=50.0, metavar="X",
                        help="deployment estimate: the server's sustained TFLOP/s")
    processes = parser.add_argument_group("real processes", "every party its own process (docs/distributed.md)")
    processes.add_argument("--distributed", action="store_true",
                        help="run every party as its own process on torch.distributed: spawned here over loopback, "
                             "or, started by torchrun, this process is one party (docs/distributed.md)")
    processes.add_argument("--max-restarts", type=positive(int, or_zero=True), default=0, metavar="N",
                        help="--distributed spawned here: when a party fails, end the others and start them all "
                             "again, up to N times; they go on from their checkpoints (needs --save DIR), as under "
                             "torchrun --max-restarts N")
    processes.add_argument("--provision", metavar="DIR",
                        help="write one kit per party of this federation (its sites as --sites, --site-sizes or "
                             "--data give them) into DIR: DIR/server, DIR/client-0, ...; nothing is trained "
                             "(needs the [secure] extra; docs/distributed.md)")
    processes.add_argument("--key", metavar="PATH",
                        help="--distributed: every message between the parties authenticated and encrypted, and "
                             "what they write to the rendezvous store signed, with the kits of --provision: PATH "
                             "is their folder when the parties are spawned here, this party's own kit under "
                             "torchrun (default: none, gloo's plain TCP; needs the [secure] extra)")
    processes.add_argument("--insecure", action="store_true",
                        help="--distributed across machines (MASTER_ADDR not a loopback address) without --key: "
                             "run although the parties' traffic is neither authenticated nor encrypted, inside a "
                             "network you trust (a VPN; docs/distributed.md)")
    processes.add_argument("--timeout", type=positive(float), default=None, metavar="SECONDS",
                        help="--distributed: the longest a party waits for another (default: one round of all "
                             "the parties' work at 5 GFLOP/s, plus a minute)")
    output = parser.add_argument_group("output", "files written as each scheme ends")
    output.add_argument("--json", metavar="PATH", help="write every row as JSON (rewritten as each row ends)")
    output.add_argument("--csv", metavar="PATH", help="write every row as CSV (rewritten as each row ends)")
    output.add_argument("--save", metavar="DIR",
                        help="write each scheme's deployed model per site (DIR/SCHEME/site-K.pt, with model.json) "
                             "and DIR/results.json with every round's history, as each scheme ends")
    output.add_argument("--resume", metavar="DIR",
                        help="go on with a run saved with --save DIR that was interrupted (give its other flags "
                             "again): its finished schemes are kept, the interrupted one goes on from its last "
                             "complete round (DIR/SCHEME/checkpoint.pt; --distributed: each party's own, "
                             "checkpoint-PARTY.pt), the rest start; --save DIR implied")
    output.add_argument("--plot", metavar="PATH.png",
                        help="draw AUROC per round and final AUROC against total bytes (needs the [plot] extra)")
    args = parser.parse_args(argv)
    named = dict.fromkeys(name for name, _ in args.defense)
    if args.schemes is None:  # --tradeoff: a split scheme and FedAvg, as the defenses apply; else where all of them do
        args.schemes = ([scheme for scheme in ("sl-client", "fedavg") if any(scheme in APPLIES[name] for name in named or LADDER)]
                        if args.tradeoff else [scheme for scheme in SCHEMES if all(scheme in APPLIES[name] for name in named)])
    for name in named if not args.tradeoff else ():
        if set(args.schemes) - set(APPLIES[name]):
            parser.error(f"--defense {name.replace('_', '-')} is for {','.join(APPLIES[name])}, not "
                         f"{','.join(scheme for scheme in args.schemes if scheme not in APPLIES[name])}")
    for scheme in args.schemes if args.tradeoff else ():
        if not [name for name in named or LADDER if scheme in APPLIES[name]]:
            parser.error(f"--tradeoff: no defense{' given' if named else ''} applies to {scheme}")
    if not args.schemes:
        parser.error(f"--defense: no scheme takes {' and '.join(name.replace('_', '-') for name in named)} at once")
    if "dp" in named and args.clip == math.inf and dict(args.defense)["dp"]:
        parser.error("--defense dp:SIGMA adds noise of SIGMA x --clip: it needs a finite --clip")
    if any(name == "gradient_noise" for name, _ in args.defense) and not args.label_private:
        parser.error("--defense gradient-noise: only a --label-private client returns gradients to the server")
    if args.tradeoff and args.costs_only:
        parser.error("--tradeoff measures trained models; --costs-only trains none")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.profile and args.costs_only:
        parser.error("--profile times training; it cannot go with --costs-only")
    if args.inversion_curve and (args.costs_only or args.distributed):
        parser.error("--inversion-curve trains one client in this process: not with --costs-only or --distributed")
    if args.costs_only and (args.attack or args.cuts_sweep):
        parser.error("--attack and --cuts-sweep need trained models; --costs-only trains none")
    if args.distributed and (args.label_private or args.cuts_sweep):
        parser.error("--distributed runs the schemes as they are: --label-private and --cuts-sweep run in the "
                     "simulation")
    if args.resume:
        if args.save and os.path.abspath(args.save) != os.path.abspath(args.resume):
            parser.error(f"--resume {args.resume} saves where it resumes; --save {args.save} is elsewhere")
        args.save = args.resume
    if args.max_restarts and not (args.distributed and args.save):
        parser.error("--max-restarts starts the parties of a --distributed run again from their checkpoints: "
                     "it needs --distributed and --save DIR")
    if args.save and args.costs_only:
        parser.error("--save keeps trained models; --costs-only trains none")
    if args.distributed and (args.costs_only or args.profile):
        parser.error("--distributed trains for real; it cannot go with --costs-only or --profile")
    if args.key and not args.distributed:
        parser.error("--key authenticates the parties of a --distributed run; add --distributed")
    if args.key and args.insecure:
        parser.error("--key protects the traffic, --insecure runs it unprotected: choose one")
    if args.provision and (args.distributed or args.key):
        parser.error("--provision writes the kits and trains nothing; start the run with --distributed --key after")
    for flag, wanted in (("--provision", args.provision), ("--key", args.key)):
        try:
            if wanted:
                secure.require(flag)
        except ValueError as error:
            parser.error(str(error))
    if args.distributed and args.partition != "site":
        parser.error("--distributed: each client reads its own site; --partition iid/dirichlet pools them first")
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if path and os.path.isdir(path):
            parser.error(f"{flag} {path} is a folder; it names the file to write")
    if args.save and os.path.exists(args.save) and not os.path.isdir(args.save):
        parser.error(f"--save {args.save} is a file; it names a folder to write into")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install -e \".[plot]\"")
    if (args.site_sizes or args.same_scanner) and args.data:
        parser.error(f"{'--site-sizes' if args.site_sizes else '--same-scanner'} is for the synthetic federation, not --data")
    if args.site_sizes and args.sites and args.sites != len(args.site_sizes):
        parser.error(f"--sites {args.sites} but --site-sizes lists {len(args.site_sizes)} sites")
    if args.rounds > MAX_ROUNDS:
        parser.error(f"--rounds {args.rounds}: at most {MAX_ROUNDS} (a typo guard; a run that long wants --save and --resume)")
    if args.image_size < data.MIN_IMAGE_SIZE:  # the least that leaves DenseNet-121 1x1 pixels at its last cut
        parser.error(f"--image-size: image size {args.image_size} is too small for DenseNet-121 "
                     f"(at least {data.MIN_IMAGE_SIZE} pixels)")
    return args, parser


def memory_needed(args, site_sizes, channels):
    """About the most memory a run of these settings holds at once, by part, in bytes: the images (twice:
    centralized training pools a copy), the activations autograd keeps for one mini-batch's backward (measured
    on the meta device), per site a model copy training with Adam, its deployed copy and the server's copy
    for it (9 copies' worth of the weights), and under --distributed about 0.5 GB per process (Python, torch)."""
    with torch.device("meta"):
        model = nn.Sequential(*split_densenet121(args.cut))
    saved = {}

    def keep(tensor):
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(torch.empty(max(args.batch_size, 2), channels, args.image_size, args.image_size, device="meta")).sum()
    weights = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    return dict(images=2 * sum(site_sizes) * channels * args.image_size ** 2 * 4, activations=sum(saved.values()),
                models=9 * len(site_sizes) * weights,
                processes=int(0.5e9) * (len(site_sizes) + 1) if args.distributed else 0)


def memory_available(device):
    """(bytes this run may use on the training device, on the host): free GPU memory, and the host's
    MemAvailable (Linux; None where it cannot be read)."""
    host = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as file:
            host = 1024 * int(next(line for line in file if line.startswith("MemAvailable:")).split()[1])
    return (torch.cuda.mem_get_info()[0] if device == "cuda" else host), host


def check_memory(args, parser):
    """Refuse, before anything starts, a run that cannot fit in this machine's memory (`memory_needed`): one
    line with the estimate, exit status 2."""
    try:
        sizes = (list(data.site_sizes(args.data).values()) if args.data else
                 args.site_sizes or (list(data.SITE_SIZES) + [96] * max(0, (args.sites or 3) - len(data.SITE_SIZES)))[:args.sites or 3])
    except ValueError as error:
        parser.error(str(error))
    channels = 1  # (an X-ray: one channel, as data.py reads it)
    needed = memory_needed(args, sizes, channels)
    on_device, on_host = memory_available(args.device)
    checks = ([("the GPU's", needed["activations"] + needed["models"], on_device),
               ("this machine's", needed["images"] + needed["processes"], on_host)] if args.device == "cuda"
              else [("this machine's", sum(needed.values()), on_host)])
    for what, part, available in checks:
        if available is not None and part > available:
            parts = ", ".join(f"{name} {report.human(value, 'B')}" for name, value in needed.items() if value)
            parser.error(f"{len(sizes)} sites, {args.image_size} px, batch {args.batch_size}: about "
                         f"{report.human(part, 'B')} needed ({parts}), {report.human(available, 'B')} of "
                         f"{what} memory free")


class Profile(Observer):
    """Where one scheme's training time goes: forward passes, backward passes, optimizer steps, transfers
    (`run.send`) and the rest (batches, loss, bookkeeping), and peak memory. Timed while the run's own clock
    runs (set-up, warm-up and scoring apart), with torch's global module and optimizer hooks and, for a backward
    pass, a hook on the graph node of each outermost module's output; on CUDA it synchronises at every
    boundary, so the run itself is slower."""

    PARTS = ("forward", "backward", "optimizer", "transfers")

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.depth, self.since, self.paused, self.in_backward = 0, None, True, False

    def round_started(self, run):
        self.paused = False

    def round_ending(self, run):
        self.paused = True

    def sending(self, run, source, destination, link, objects):
        self._start()

    def sent(self, run, source, destination, link, objects):
        self._stop("transfers")

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _start(self, *args):
        self.depth += 1
        if self.depth == 1 and not self.paused:
            self.since = self._now()

    def _stop(self, part):
        self.depth -= 1
        if self.depth == 0 and self.since is not None:
            self.seconds[part] += self._now() - self.since
            self.since = None

    def _forward_ended(self, module, inputs, output):
        """An outermost module's forward: its backward pass starts where the gradient reaches its output."""
        if self.depth == 1 and not self.paused and isinstance(output, torch.Tensor) and output.grad_fn is not None:
            output.grad_fn.register_prehook(self._backward_started)
        self._stop("forward")

    def _backward_started(self, grad_outputs):
        if not self.in_backward:
            self.in_backward = True
            self._start()
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)  # at the pass's end

    def _backward_ended(self):
        self.in_backward = False
        self._stop("backward")

    @contextlib.contextmanager
    def measure(self):
        """Time everything run inside; peak memory is that of this block (GPU) or of the process (CPU)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                open("/proc/self/clear_refs", "w").write("5")  # restart the process's peak resident memory
        handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._start),
                   torch.nn.modules.module.register_module_forward_hook(self._forward_ended),
                   optimizer_hooks.register_optimizer_step_pre_hook(self._start),
                   optimizer_hooks.register_optimizer_step_post_hook(lambda *args: self._stop("optimizer"))]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            status = open("/proc/self/status").read()
            self.peak_bytes = int(status.split("VmHWM:")[1].split()[0]) * 1024

    def row(self, result):
        images = result["history"][-1]["round"] * sum(result["num_examples"])
        total = result["seconds"]
        shares = [f"{100 * self.seconds[part] / total:.0f}%" for part in self.PARTS]
        other = f"{100 * (1 - sum(self.seconds.values()) / total):.0f}%"
        return [result["scheme"], f"{images / total:.1f}", *shares, other, report.human(self.peak_bytes, "B")]


class Privacy(Observer):
    """What each party could learn from each round, measured after it (untimed) from what it received
    (`privacy.measure` on the `recorder`'s record), into the round's entry of the history."""

    def __init__(self, recorder, args, failed, say):
        self.recorder, self.args, self.failed, self.say = recorder, args, failed, say

    def round_ended(self, run, entry, deployed):
        found, leak = privacy.measure(run, self.recorder, deployed, self.args.attack_steps if self.args.attack else 0,
                                      lambda what, function: attempt(what, function, self.failed, self.say))
        entry["privacy"] = dict(found, leak=leak)


class Poison(Observer):
    """--poison SITE:nan|SITE:SCALE: what client SITE uploads for averaging is spoiled on its way (a NaN in its
    first weight, or every weight times SCALE), where this process holds it: the averaging's checks are to
    refuse it (`common.refused_uploads`). First among the observers, so that a transport sends the spoiled copy."""

    def __init__(self, site, scale):
        self.site, self.scale = site, scale

    def sent(self, run, source, destination, link, objects):
        if link != "client->aggregator" or source != self.site or objects[0][next(iter(objects[0]))].is_meta:
            return None
        spoiled = {key: value.clone() for key, value in objects[0].items()}
        weights = [value for value in spoiled.values() if value.is_floating_point()]
        if math.isnan(self.scale):
            weights[0].view(-1)[0] = math.nan
        else:
            torch._foreach_mul_(weights, self.scale)
        return (spoiled, *objects[1:])


class Estimate:
    """How long the run will take, from what it measured and never before: after the first round it trains,
    that round's wall time (the scheme's set-up and the round's evaluation included) for every round of every
    scheme (they all train the same FLOPs, tested); after each scheme, the mean wall time of the schemes done
    for each one left, which picks up what FLOPs do not tell (copies, averaging, the privacy measures)."""

    def __init__(self, num_jobs, rounds, say):
        self.num_jobs, self.rounds, self.say = num_jobs, rounds, say
        self.done, self.began, self.told = [], None, False

    def job_started(self):
        self.began = time.perf_counter()

    def round_ended(self):
        if not self.told:
            self.told = True
            seconds = time.perf_counter() - self.began
            self.say(f"expected: about {duration(seconds * self.rounds * self.num_jobs)} for the run "
                     f"({self.num_jobs} x {self.rounds} rounds at {seconds:.1f} s, as this first one took)", flush=True)

    def job_ended(self):
        self.done.append(time.perf_counter() - self.began)
        left = self.num_jobs - len(self.done)
        if left:
            self.say(f"expected: about {duration(statistics.mean(self.done) * left)} more ({len(self.done)} of "
                     f"{self.num_jobs} done in {duration(sum(self.done))})", flush=True)


def duration(seconds):
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def load_sites(args):
    if args.data is None:
        sizes = args.site_sizes
        return data.synthetic_sites(num_sites=len(sizes) if sizes else args.sites or 3, image_size=args.image_size,
                                    site_sizes=sizes, shapes_only=args.costs_only, same_scanner=args.same_scanner)
    train_sets, test_sets = data.folder_sites(args.data, image_size=args.image_size, num_sites=args.sites,
                                              partition=args.partition)
    if args.costs_only:  # counting needs the shapes only
        train_sets, test_sets = ([data.Site(s.images.to("meta"), s.labels, s.name) for s in sets]
                                 for sets in (train_sets, test_sets))
    return train_sets, test_sets


def deployment_seconds(row, bandwidth_mbit, client_tflops, server_tflops, latency_ms):
    """Estimated time to run the scheme for real: compute at the stated speeds, transfers at the stated
    bandwidth, and every transfer's wait for the other side: one one-way delay (half the round-trip time).

    Sequential turns (split learning, SplitFed v2): everything adds up. Parallel clients (FedAvg, SplitFed
    v1/v3, the centralized upload): the slowest client sets the pace; client work and activations (their bytes
    and their transfers) scale with a site's images, so the largest site's share is max(n)/sum(n), and each
    client moves 1/K of the weights, in 1/K of the weight transfers.
    """
    sizes = row["num_examples"]
    share, weight_share = (max(sizes) / sum(sizes), 1 / len(sizes)) if row["parallel"] else (1.0, 1.0)

    def on_the_critical_path(per_link):  # bytes or transfers
        return ((per_link["client->server"] + per_link["server->client"]) * share + per_link["client->client"]
                + (per_link["client->aggregator"] + per_link["aggregator->client"]) * weight_share)

    flops = row["flops"]
    compute = (flops["client"] * share / client_tflops + (flops["server"] + flops["aggregator"]) / server_tflops) / 1e12
    transfer = on_the_critical_path(row["bytes"]) * 8 / (bandwidth_mbit * 1e6)
    return compute + transfer + on_the_critical_path(row["messages"]) * latency_ms / 2e3


def attempt(what, function, failed, say):
    """`function()`, run after training: if it raises, the one-line cause goes to `failed[what]` and is
    printed, and None is returned, so that a failing measurement never loses what training computed."""
    try:
        return function()
    except distributed.PartyFailed:
        raise
    except Exception as error:
        failed[what] = one_line(error)
        say(f"{what} failed: {failed[what]}", flush=True)
        return None


def what_the_server_learns(scheme, history, args):
    """A scheme's privacy: what leaves a site, whether labels do, and for the split schemes each measure of
    `Privacy` in the round it was worst (the earliest of equals), with that round in
    "worst_round": an early, barely trained client part may tell more than the last."""
    found = dict(sends=SENDS.get(scheme, "activations"),
                 labels_leave=scheme == "central" or (scheme in SPLIT_SCHEMES and not args.label_private))
    for key, score in privacy.LEAKED.items():
        measured = [entry for entry in history if key in (entry.get("privacy") or {})]
        if measured:
            worst = max(measured, key=lambda entry: score(entry["privacy"]))
            found[key] = worst["privacy"][key]
            if key == "dcor":
                found["dcor_shuffled"] = worst["privacy"]["dcor_shuffled"]
            found.setdefault("worst_round", {})[key] = worst["round"]
    return found


def leak_of(history):
    """A row's "leak" and "leak_worst" (`privacy.worst_leaks`)."""
    lines, worst = privacy.worst_leaks(history)
    return dict(leak=lines, leak_worst=worst)


def defenses(args, scheme):
    """The defenses `scheme` trains under: the --defense ones together; with --tradeoff, none, then each defense
    that applies to it alone at each strength of its ladder (or at each --defense point). A dp defense clips to
    --clip and reports ε at --delta."""
    with_dp = lambda points: privacy.Defense(**dict(points), **(dict(clip=args.clip, delta=args.delta)
                                                                 if "dp" in dict(points) else {}))
    if not args.tradeoff:
        return [with_dp(args.defense)]
    points = args.defense or [(name, strength) for name, ladder in LADDER.items()
                              if name != "gradient_noise" or args.label_private for strength in ladder]
    return [privacy.Defense()] + [with_dp([(name, strength)]) for name, strength in points if scheme in APPLIES[name]]


TRAINED = ("data", "sites", "site_sizes", "same_scanner", "partition", "image_size", "cut", "bn", "batch_size", "lr",
           "bf16", "layout", "order", "schemes", "seeds", "label_private", "attack", "attack_steps", "defense",
           "clip", "delta", "tradeoff")  # what a resumed run must repeat; besides, its rounds may only grow
NOTED = ("device", "deterministic", "threads")  # what changes the numbers in their last bits only


def run_settings(args):
    """The settings --save writes to DIR/run.json, as JSON holds them (a tuple comes back a list)."""
    settings = {key: getattr(args, key) for key in TRAINED + ("rounds", "device", "deterministic")}
    return json.loads(json.dumps(dict(settings, threads=torch.get_num_threads())))


def jobs(args):
    """Every (seed, scheme, defense) the run trains, in order."""
    return [(seed, scheme, defense) for seed in range(args.seeds) for scheme in args.schemes
            for defense in defenses(args, scheme)]


def job_row(args, seed, scheme, defense):
    return dict(scheme=scheme, seed=seed, bn=args.bn, order=args.order, defense=str(defense))


def checkpoint_name(rank=None):
    """A scheme's checkpoint in its --save folder: the run's, or, in a distributed run, the party's own."""
    return "checkpoint.pt" if rank is None else f"checkpoint-{distributed.party_name(rank).replace(' ', '-')}.pt"


def resumable(args, refuse, say, rank=None):
    """--resume DIR: the rows DIR's run finished, by (scheme, seed, defense), once DIR is known to hold a run of
    these settings whose checkpoints (the server's, `rank` 0, in a distributed run) load whole. Anything else,
    before anything is written: `refuse` one line naming the setting or the file (`parser.error`: exit 2)."""
    where = f"--resume {args.resume}"
    try:
        with open(os.path.join(args.resume, "run.json")) as file:
            saved = json.load(file)
        rows = []
        if os.path.exists(os.path.join(args.resume, "results.json")):
            with open(os.path.join(args.resume, "results.json")) as file:
                rows = json.load(file)
    except FileNotFoundError as error:
        refuse(f"{where}: no {os.path.basename(error.filename)} there (a run with --save writes one)")
    except (OSError, ValueError) as error:
        refuse(f"{where}: {one_line(error)}")
    now = run_settings(args)
    for key in TRAINED:
        if saved.get(key) != now[key]:
            refuse(f"{where}: --{key.replace('_', '-')} differs (the run had {saved.get(key)}, now {now[key]})")
    for key in NOTED:
        if saved.get(key) != now[key]:
            say(f"note: the run had {key} {saved.get(key)}, now {now[key]}: the numbers may differ in their last bits")
    finished = {}
    for seed, scheme, defense in jobs(args):
        row = job_row(args, seed, scheme, defense)
        key = scheme, seed, row["defense"]
        earlier = [prior for prior in rows if not prior.get("error")
                   and (prior["scheme"], prior["seed"], prior.get("defense", "none")) == key]
        done = [len(prior["history"]) for prior in earlier]
        if args.rounds in done:
            finished[key] = earlier[done.index(args.rounds)]
            continue
        path = os.path.join(report.save_folder(row, args), checkpoint_name(rank))
        if os.path.exists(path):  # the run goes on from it: it must load whole
            try:
                done.append(len(checkpoints.load_checkpoint(path)["run"]["history"]))
            except ValueError as error:
                refuse(f"{where}: {error}")
        if max(done, default=0) > args.rounds:
            refuse(f"{where}: --rounds {args.rounds}, but {report.name(row)} has trained {max(done)} already")
    return finished


def set_determinism(deterministic):
    """--deterministic: deterministic kernels only (an error names any operation that has none), no cuDNN
    autotuning, and a fixed cuBLAS workspace (read when cuBLAS starts, so this runs before any CUDA work).
    The CPU is deterministic for a given number of threads without it."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = False


def train_scheme(scheme, seed, args, sites, transport, say, defense, observers):
    """One scheme trained from the seed's initial weights, its split clients under `defense`, its run watched by
    `observers` (and by the transport and a profile where the run has them): (result, its `Profile` or None)."""
    if transport:
        transport.begin(scheme)  # from here on: this party's busy time and peak memory for the scheme
    torch.manual_seed(seed)
    client_model, server_model = split_densenet121(args.cut)
    image_shape = sites[0][0].images.shape[1:]
    if args.label_private and scheme in SPLIT_SCHEMES:
        client_model, server_model = label_private(client_model, server_model)
    if args.costs_only:
        client_model, server_model = cost_only(client_model, server_model, image_shape)
    if transport:
        client_model, server_model = transport.parts(client_model, server_model, image_shape)
    profile = Profile(args.device) if args.profile else None
    observers = ([Poison(*planted) for planted in args.poison] + ([transport] if transport else []) + observers
                 + ([profile] if profile else []))
    with profile.measure() if profile else contextlib.nullcontext():
        result = SCHEMES[scheme](client_model, server_model, *sites, rounds=args.rounds, batch_size=args.batch_size,
                                 lr=args.lr, seed=seed, bf16=args.bf16, bn=args.bn, order=args.order,
                                 device=args.device, costs_only=args.costs_only,
                                 channels_last=args.layout == "channels-last", observers=observers,
                                 max_update_ratio=args.max_update_ratio,
                                 defense=defense if scheme in SPLIT_SCHEMES + UPLOADING else None,
                                 log=lambda line: say(line, flush=True))
    return result, profile


def main(argv=None):
    """Run the bench; returns the rows the table shows (one per scheme and seed).

    A scheme that fails keeps the other rows; a measurement after training that fails (a privacy measure,
    saving, the sweep, the plot) keeps its row, marked where its column is (the row's "failed"). Each failure
    ends as one line on stderr, and, run from the command line, the exit status is then 1.
    """
    args, parser = parse_args(argv)
    checkpoints.writer.wait()  # (an interrupted run earlier in this process: its last checkpoint is written first)
    set_determinism(args.deterministic)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.inversion_curve or args.provision:  # (tasks of their own, with no federation to train)
        return inversion_curve(args) if args.inversion_curve else provision(args, parser)
    if "RANK" not in os.environ and not args.costs_only:  # (a party started by torchrun: its machine's own affair)
        check_memory(args, parser)
    if args.distributed and "RANK" not in os.environ:  # spawn every party here; rank 0 prints the table
        return launch_parties(sys.argv[1:] if argv is None else argv, args, parser)
    transport, sites = join(args, parser)
    rank = transport.rank if transport else 0
    say = print if rank == 0 else lambda *lines, **options: None
    finished = kept_rows(args, parser, transport, say)
    rows, profiles, sweep, failed = [], [], None, {}  # failed: what failed outside the rows, and why
    if args.save and rank == 0:
        attempt("writing run.json", lambda: report.write_json(run_settings(args), os.path.join(args.save, "run.json")),
                failed, say)
    say(f"sites: {', '.join(f'{s.name} {len(s)}+{len(t)}' for s, t in zip(*sites))} (train+test images), "
        f"{args.image_size}px, cut {args.cut}, device {args.device}"
        + (f", {transport.world_size} processes" if transport else ""), flush=True)
    estimate = Estimate(len(jobs(args)) - len(finished), args.rounds,
                        say if not args.costs_only else lambda *lines, **options: None)
    for seed, scheme, defense in jobs(args):
        row, profile, model = run_job(args, seed, scheme, defense, sites, transport, finished, say, estimate)
        rows.append(row)
        profiles.append(profile)
        if sweep is None and model is not None:
            sweep = scheme, model
        report.add_ratios(rows)
        if rank == 0:
            attempt("writing the results", lambda: report.write_outputs(rows, args), failed, say)
    if transport:
        transport.close()
        if rank != 0:
            return rows
    print_tables(rows, args, transport)
    if sweep:
        sweep_cuts(*sweep, sites[0], args, failed, say)
    if any(profiles):
        print(f"\nwhere training time goes ({args.device}):")
        print(report.align([["scheme", "images/s", *Profile.PARTS, "other", "peak memory"]] + list(filter(None, profiles))))
    if args.plot:
        attempt("plot", lambda: (report.plot_tradeoff if args.tradeoff else report.plot)(rows, args.plot), failed, say)
        if "plot" not in failed:
            print(f"plot: {args.plot}")
    problems = report.failures(rows) + [f"{what} failed: {cause}" for what, cause in failed.items()]
    for problem in problems:
        print(f"bench.py: error: {problem}", file=sys.stderr, flush=True)
    if problems and argv is None:
        sys.exit(1)
    return rows


def join(args, parser):
    """(transport, sites) of this process: no transport and every site in a simulation; under --distributed,
    this party's transport (connected), its own site real and the others' shapes (`Transport.sites`)."""
    master = os.environ.get("MASTER_ADDR", "")
    if args.distributed and not (args.key or args.insecure) and not distributed.is_loopback(master):
        parser.error(f"--distributed: MASTER_ADDR {master} is not a loopback address: --key (the kits of "
                     f"--provision) authenticates and encrypts the parties' traffic (docs/distributed.md); "
                     f"--insecure runs it unprotected, inside a network you trust (a VPN)")
    kit = None
    if args.key:
        try:
            kit = secure.load_kit(args.key, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        except ValueError as error:
            parser.error(str(error))
    transport = distributed.connect(args.timeout or 1800, args.device, kit) if args.distributed else None
    rank = transport.rank if transport else 0
    try:
        sites = transport.sites(lambda: load_own_site(args, rank - 1)) if transport else load_sites(args)
    except (ValueError, OSError) as error:
        if transport:
            distributed.stop(rank, f"{distributed.party_name(rank)}: {error}")
        parser.error(str(error))
    if any(site >= len(sites[0]) for site, _ in args.poison):
        parser.error(f"--poison: there are {len(sites[0])} sites, numbered from 0")
    if transport:
        transport.wire.timeout = args.timeout or distributed.schedule_timeout(args.cut, *sites)
        if transport.restart:  # started again (torchrun --max-restarts, or ours): each party from its checkpoints
            args.resume = args.save
            if rank == 0:
                print(f"restart {transport.restart}: " + (f"every party goes on from its checkpoints in {args.save}"
                                                          if args.save else "no --save DIR, so every scheme starts again"))
    return transport, sites


def kept_rows(args, parser, transport, say):
    """--resume: the rows the run finished before, by (scheme, seed, defense), which are not trained again
    (`resumable`); under a transport every party learns from rank 0 which they are."""
    rank = transport.rank if transport else 0
    refuse = (lambda message: transport.fail(f"server: {message}")) if transport else parser.error
    finished = resumable(args, refuse, say, rank if transport else None) if args.resume and rank == 0 else {}
    if transport and args.resume:  # the rows rank 0 keeps from results.json: the other parties skip them too
        keys = [(scheme, seed, str(defense)) for seed, scheme, defense in jobs(args)]
        kept = transport.share([float(key in finished) for key in keys])
        finished = finished if rank == 0 else {(scheme, seed, defense): job_row(args, seed, scheme, defense)
                                               for (scheme, seed, defense), flag in zip(keys, kept) if flag}
    return finished


def run_job(args, seed, scheme, defense, sites, transport, finished, say, estimate):
    """One row of the table: `scheme` trained from `seed`'s weights under `defense` (or kept, if a resumed run
    finished it), then measured and saved. Returns (row, its profile line or None, and for the cuts sweep site
    0's deployed model, if the scheme is one that sweeps)."""
    rank = transport.rank if transport else 0
    row = job_row(args, seed, scheme, defense)
    failed, row_say = {}, lambda line, **options: say(f"{report.name(row)}: {line}", **options)
    sweeps = args.cuts_sweep and scheme in SPLIT_SCHEMES + ("central",)
    if (scheme, seed, row["defense"]) in finished:
        row_say(f"finished before: kept from {args.save}", flush=True)
        return (finished[scheme, seed, row["defense"]], None,
                load_site_model(os.path.join(report.save_folder(row, args), "site-0.pt")) if sweeps else None)
    observers = []
    if not args.costs_only:  # what each party receives, recorded as it arrives, then measured after each round
        recorder = privacy.Recorder(sites[0], args.batch_size, seed)
        observers += [recorder, Privacy(recorder, args, failed, row_say)]
    if args.save:  # after every round: DIR/SCHEME/checkpoint.pt (`--resume`), or each party's own
        observers.append(Checkpoint(fresh_checkpoint(row, args, rank if transport else None), transport))
    progress = lambda line, **options: (say(line, **options), estimate.round_ended())
    estimate.job_started()
    try:
        result, profile = train_scheme(scheme, seed, args, sites, transport, progress, defense, observers)
    except distributed.PartyFailed as error:
        distributed.stop(rank, str(error))
    except Exception as error:  # one scheme failing never loses the rows already finished
        if transport:  # ... but the other parties cannot go on without this one: all stop, with the cause
            transport.fail(f"{distributed.party_name(rank)}: {scheme}: {one_line(error)}")
        row["error"] = one_line(error)
        say(f"{scheme} failed: {row['error']}", flush=True)
        estimate.job_ended()
        return row, None, None
    models = result.pop("models")
    row.update(result, deploy_seconds=deployment_seconds(result, args.bandwidth, args.client_tflops,
                                                          args.server_tflops, args.latency), **guarantee(defense, args))
    if args.costs_only:
        row["seconds"] = None
    line = profile and attempt("profile", lambda: profile.row(row), failed, row_say)
    if args.save and rank == 0:
        attempt("save", lambda: report.save_models(models, row, sites[0], args, args.label_private
                                                   and scheme in SPLIT_SCHEMES), failed, row_say)
    row.update(privacy=what_the_server_learns(scheme, row["history"], args), **leak_of(row["history"]))
    if failed:  # (besides what the run itself reports: a checkpoint that could not be written)
        row["failed"] = {**row.get("failed", {}), **failed}
    estimate.job_ended()
    return row, line, models[0] if sweeps else None


def guarantee(defense, args):
    """A row's ε at δ: client-level differential privacy of its clients' uploads over the run's rounds, where its
    defense has noise on them (`privacy.epsilon`); else None, no guarantee (the activation defenses have none)."""
    sigma = defense.dp if defense is not None else 0
    return dict(epsilon=privacy.epsilon(sigma, args.rounds, defense.delta) if sigma else None,
                delta=defense.delta if sigma else None)


def fresh_checkpoint(row, args, rank):
    """Where a row's checkpoint goes under --save (`checkpoint_name`); a new run in an old folder (no --resume)
    starts afresh, removing the checkpoints it finds there."""
    path = os.path.join(report.save_folder(row, args), checkpoint_name(rank))
    for stale in (path, checkpoints.previous(path)) if not args.resume else ():
        if os.path.exists(stale):
            os.remove(stale)
    return path


def print_tables(rows, args, transport):
    """The results, the costs, and what the server can learn (with --attack, --label-private, --tradeoff)."""
    if not args.costs_only:
        print(f"\nAUROC: pooled over every site's test images, each site scored by the model it deploys (BatchNorm "
              f"statistics: {args.bn});\n[95% CI]: stratified bootstrap, 2000 resamples. wall s: training time.")
        print(report.results_table(rows))
    print("\nbytes per link (c: clients, s: server, agg: aggregator), FLOPs per party, deploy s: the estimated time "
          "on a real\nnetwork (--bandwidth, --latency, --client-tflops, --server-tflops)"
          + ("; wire: payload bytes the processes sent (evaluation apart); framing: what those messages took beyond "
             "their payloads (lengths, headers, and with --key a 16-byte tag per MiB)" if transport else "") + ".")
    print(report.costs_table(rows))
    if args.tradeoff:
        print("\nwhat each defense buys (each measure in the round it was worst: dCor², attack, label leak; "
              "the attack: site 0's images, the attacker knowing site 1's):")
        print(report.tradeoff_table(rows))
    elif args.attack or args.label_private:
        print("\nwhat the server can learn (dCor² and label leak: mean over sites; the attack: site 0's images, "
              "the attacker site 1):")
        print(report.privacy_table(rows))
        print("\nwho could learn what (each attacker in the round it learnt most; SSIM of its reconstructions of the "
              "victim's\nimages and, in brackets, of its prior alone; gain: (SSIM - floor) / (1 - floor)):")
        print(report.leak_table(rows))


def inversion_curve(args):
    """--inversion-curve: where FedAvg starts to leak (`privacy.inversion_curve`), site 1's images the prior."""
    train_sets = load_sites(args)[0]
    torch.manual_seed(0)  # seed 0's initial weights, as every scheme's first run
    model = nn.Sequential(*split_densenet121(args.cut)).to(memory_format=torch.channels_last)
    print(f"FedAvg's update inverted by the aggregator ({args.image_size} px, {args.attack_steps} steps, the seed's "
          f"initial weights, labels known, the prior: site 1's mean image):", flush=True)
    rows = privacy.inversion_curve(model, train_sets[0].images, train_sets[0].labels, train_sets[1].images, args.lr,
                                   args.attack_steps, seed=0, log=lambda line: print(line, flush=True))
    print(report.curve_table(rows))
    if args.json:
        try:
            report.write_json(rows, args.json)
        except OSError as error:
            print(f"bench.py: error: {error}", file=sys.stderr)
            sys.exit(1)
    return rows


def sweep_cuts(scheme, model, train_sets, args, failed, say):
    """--cuts-sweep: the server's view at every cut of one trained model (`privacy.cuts_sweep`), and its plot."""
    client_model, server_model = model
    print(f"\nthe server's view at every cut of {scheme}'s model (site 0's training images"
          f"{'; the attacker: site 1' if args.attack else ''}):")
    cuts = attempt("cuts sweep", lambda: privacy.cuts_sweep(client_model, server_model, train_sets, args.batch_size,
                                                            attack=args.attack, steps=args.attack_steps), failed, say)
    if cuts:
        print(report.cuts_table(cuts))
        if args.plot:
            attempt("cuts plot", lambda: report.plot_cuts(cuts, args.plot.removesuffix(".png") + "-cuts.png"), failed, say)


def num_sites(args, parser):
    """How many sites the run's federation has (the clients of a distributed run)."""
    try:
        return len(data.site_names(args.data)) if args.data else len(args.site_sizes) if args.site_sizes else args.sites or 3
    except ValueError as error:
        parser.error(str(error))


def provision(args, parser):
    """--provision DIR: one kit per party (`secure.provision`); returns no rows."""
    try:
        paths = secure.provision(args.provision, num_sites(args, parser) + 1)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(f"kits for {len(paths)} parties in {args.provision}: {', '.join(map(os.path.basename, paths))}; "
          f"each party's machine gets its own alone (docs/distributed.md)")
    return []


def launch_parties(argv, args, parser):
    """`--distributed` without torchrun: every party a process on this machine; returns rank 0's rows."""
    num_parties = num_sites(args, parser) + 1
    if args.key:  # every party's kit, checked here, before any party starts
        if not os.path.isdir(args.key):
            parser.error(f"--key {args.key}: the parties spawned here take their kits from a folder (--provision DIR)")
        for rank in range(num_parties):
            try:
                secure.load_kit(args.key, rank, num_parties)
            except ValueError as error:
                parser.error(str(error))
    if args.resume:  # refused here, in one line, before any party starts
        resumable(args, parser.error, lambda *lines, **options: None, rank=0)
    threads = args.threads or max(1, (os.cpu_count() or 1) // num_parties)
    with tempfile.TemporaryDirectory() as folder:
        rows_path = args.json or os.path.join(folder, "rows.json")
        status = distributed.launch(argv, num_parties, threads, rows_path, args.max_restarts)
        if status:
            sys.exit(status)
        with open(rows_path) as file:
            return json.load(file)


def load_own_site(args, site):
    """A client's own site in a distributed run: its images, made or read here (a folder of several sites
    gives this client the one at its index; a folder of one site is this client's own)."""
    if args.data is None:
        sizes = args.site_sizes
        train_sets, test_sets = data.synthetic_sites(num_sites=len(sizes) if sizes else args.sites or 3,
                                                     image_size=args.image_size, site_sizes=sizes, only_site=site,
                                                     same_scanner=args.same_scanner)
        return train_sets[site], test_sets[site]
    if len(data.site_names(args.data)) == 1:
        train_sets, test_sets = data.folder_sites(args.data, image_size=args.image_size)
        return train_sets[0], test_sets[0]
    train_sets, test_sets = data.folder_sites(args.data, image_size=args.image_size, only_site=site)
    return train_sets[site], test_sets[site]


def cli():
    """`python bench.py`: Ctrl-C ends the run with one line (what is saved stays, and says how to go on), not a
    traceback. A party of a distributed run lets it through, to its excepthook, which stops the others too."""
    try:
        main()
    except KeyboardInterrupt:
        if "RANK" in os.environ:
            raise
        saved = next((sys.argv[i + 1] for i, flag in enumerate(sys.argv[:-1]) if flag in ("--save", "--resume")), None)
        print("bench.py: interrupted" + (f"; go on with the same flags and --resume {saved}" if saved else ""),
              file=sys.stderr, flush=True)
        sys.exit(130)
    # Done, every file closed and every checkpoint written: skip Python's own clean-up of torch, torchvision and
    # what they import, about 2 s per process (a distributed run waits for each of its parties').
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    cli()
