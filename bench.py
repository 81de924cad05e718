"""Train every scheme on the same federation and print one comparison table.

    python bench.py                                  # the synthetic federation, all seven schemes, CPU or GPU
    python bench.py --costs-only --image-size 224    # bytes and FLOPs at the paper's scale, no training
    python bench.py --distributed                    # every party its own process, the tensors on the wire
    python bench.py --attack --cuts-sweep            # what the server can learn, at the cut and at every cut
    python bench.py --tradeoff --attack              # how much privacy each defense buys, and at what price

Each row: AUROC (pooled with its 95% interval, and per site), accuracy, bytes on every link, FLOPs per party, wall
time and its ratio to centralized training, an estimated deployment time (`estimates.deployment_seconds`), whether
labels leave the sites and what each party could learn (`privacy`). This file is the experiment: the flags, the jobs
and the tables; what it attaches to each scheme's run (the hooks of the lab) lives with its own concern.
"""
import argparse
import contextlib
import math
import os
import signal
import sys

# (before torch loads: c10d's C++ traces would bury each failure's one line; TORCH_CPP_LOG_LEVEL=INFO shows them)
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
import torch  # noqa: E402
from torch import nn

import attacks
import checkpoints
import data
import distributed
import estimates
import fedlearn
import inversion
import labelprivate
import launch
import privacy
import profiler
import report
import resume
import secure
import splitfed
import splitlearn
from checkpoints import Checkpoint, one_line
from common import BN_SETTINGS, ORDERS
from defenses import Defense, epsilon
from densenet_split import CUTS, split_densenet121
from robust import Poison, Screen
from standins import CostsOnly, cost_only
from wire import PartyFailed

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
PARALLEL = ("central", "fedavg", "sfv1", "sfv3")  # the schemes whose clients work at once (the deployment estimate)
SENDS = {"central": "images", "fedavg": "weights"}  # what leaves a site; the split schemes send activations
LADDER = dict(nopeek=(0.1, 0.3, 1, 3), noise=(0.1, 0.3, 1), gradient_noise=(0.1, 0.3, 1), dp=(0, 0.0001, 0.001, 0.01, 1))
APPLIES = dict(nopeek=SPLIT_SCHEMES, noise=SPLIT_SCHEMES, gradient_noise=SPLIT_SCHEMES, dp=UPLOADING)  # who defends how


def silent(*lines, **options):
    """What a party other than the server says: nothing (the server prints the run's lines)."""


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
    """NAME:STRENGTH, e.g. nopeek:0.3, as (attribute of defenses.Defense, strength)."""
    name, _, strength = text.partition(":")
    if name not in Defense.NAMES:
        raise argparse.ArgumentTypeError(f"unknown defense {name!r} in {text!r}; choose from {', '.join(Defense.NAMES)}")
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
    parser = Parser(description="Train every scheme on one federation and compare AUROC, bytes, FLOPs and time "
                                "(docs/bench.md).", formatter_class=Formatter)
    add = parser.add_argument_group("data", "the federation: synthetic (default) or X-ray folders").add_argument
    add("--data", metavar="PATH",
        help="X-ray folder, CSV manifest or MedMNIST .npz file(s) (docs/data.md); default: the synthetic federation")
    add("--sites", type=positive(int), help=f"number of sites (default: {data.NUM_SITES} synthetic, or the folder's own)")
    add("--site-sizes", type=size_list, metavar="N,N,...",
        help=f"synthetic images per site, train and test (default: {','.join(map(str, data.SITE_SIZES))}, then 96)")
    add("--same-scanner", action="store_true", help="synthetic sites all acquire with one scanner (data.SHARED_SCANNER), "
                                                    "differing in size and prevalence only")
    add("--partition", choices=("site", "iid", "dirichlet"), default="site",
        help="--data: keep its sites, or pool and split into --sites")
    add("--max-pixels", type=positive(int), default=data.MAX_PIXELS, metavar="N",
        help=f"--data: an image of more pixels is refused from its header, before decoding (default: "
             f"{data.MAX_PIXELS:,}; Pillow's own limit, about 179 million, stays)")
    add("--data-seed", type=int, default=0, metavar="N",
        help="the seed that draws the federation: synthetic images, --partition's split, each site's test split "
             "(default: 0; --seeds redraws the weights and the batches only)")
    add("--image-size", type=positive(int), default=48, metavar="PX", help="image side in pixels")
    add = parser.add_argument_group("training", "what trains, and how").add_argument
    add("--schemes", type=scheme_list, metavar="LIST", help="comma-separated schemes to run (default: all; the split "
                                                            "schemes with --defense; sl-client and fedavg with --tradeoff)")
    add("--rounds", type=positive(int), default=5, help="rounds (each: every training image once)")
    add("--cut", choices=CUTS, default="transition1", metavar="NAME", help=f"split point, one of {', '.join(CUTS)}")
    add("--bn", choices=BN_SETTINGS, default="local", help="BatchNorm statistics of the deployed models: local (each "
                                                           "site's own training images) or averaged (as training left them)")
    add("--batch-size", type=positive(int), default=32, help="mini-batch size")
    add("--lr", type=positive(float), default=1e-3, help="Adam learning rate")
    add("--order", choices=ORDERS, default="fixed", help="the order of split learning's and SplitFed v2's client turns: "
                                                         "fixed (site order, as the paper) or shuffled (seeded, each round)")
    add("--seeds", type=positive(int), default=1, help="seeds 0..N-1; mean ± std over seeds")
    add("--label-private", action="store_true",
        help="split schemes keep the classifier head and the loss at the client (U-shaped): labels never leave a site")
    add("--defense", type=defense, action="append", default=[], metavar="NAME:STRENGTH",
        help="a client-side defense, several allowed (docs/privacy.md): nopeek:ALPHA, noise:SIGMA, gradient-noise:SIGMA "
             "(--label-private) for the split schemes; dp:SIGMA for fedavg, sfv1, sfv2 (client-level differential "
             "privacy: each update clipped to --clip, plus noise of SIGMA x --clip; ε at --delta); default: none")
    add("--clip", type=positive(float, or_infinite=True), default=50.0, metavar="NORM",
        help="--defense dp: the L2 norm each client's update is clipped to (inf: unbounded)")
    add("--delta", type=positive(float), default=1e-5, metavar="D", help="--defense dp: the δ at which ε is reported")
    add("--max-update-ratio", type=positive(float, or_infinite=True), default=10.0, metavar="X",
        help="averaging leaves out an upload not finite, or farther from the round's median upload than X times the "
             "median distance (3 sites or more; inf: never for its distance)")
    add("--poison", type=poison, action="append", default=[], metavar="SITE:nan|SITE:SCALE",
        help="test the averaging's checks: client SITE's uploads carry a NaN, or are multiplied by SCALE")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available, else cpu")
    add("--bf16", action="store_true", help="bf16 autocast: halves activation bytes (docs/gpu.md: when it is faster)")
    add("--layout", choices=("channels-last", "contiguous"), default="channels-last",
        help="memory layout of images, activations and convolution weights (the numbers differ in the last bits)")
    add("--deterministic", action="store_true", help="the same seed gives the same models on a GPU too: deterministic "
                                                     "kernels, no cuDNN autotuning (a CPU run is so without it)")
    add("--threads", type=positive(int), metavar="N", help="threads per process (default: torch's; with --distributed "
                                                           "spawned here, the cores shared among the processes)")
    add = parser.add_argument_group("what to measure", "besides AUROC, bytes, FLOPs and time").add_argument
    add("--attack", action="store_true", help="also run the reconstruction attacks on what each party received, after "
                                              "every round (docs/privacy.md)")
    add("--attack-steps", type=positive(int), default=1000, metavar="N",
        help="the attacks' decoder training steps (the inversion of FedAvg's update: a fifth as many)")
    add("--inversion-curve", action="store_true",
        help="instead of training the schemes: FedAvg's aggregator inverts one client's update after 1 local step on "
             "1, 4 and 8 of site 0's images, then 2 and 8 steps on 8 (--attack-steps steps each)")
    add("--tradeoff", action="store_true",
        help="train each scheme undefended and at each strength of a ladder per defense that applies (or at the "
             "--defense points given), and print privacy against AUROC (docs/privacy.md)")
    add("--cuts-sweep", action="store_true", help="after the run, the server's view at every cut of one trained model: "
                                                  "dCor², and with --attack the reconstruction")
    add("--costs-only", action="store_true",
        help="count bytes and FLOPs without training (the same loops, model parts that do no arithmetic)")
    add("--profile", action="store_true", help="also print per scheme images per second, the shares of time in forward, "
                                               "backward, optimizer and transfers, and peak memory")
    add("--bandwidth", type=positive(float), default=100.0, metavar="MBIT",
        help="deployment estimate: each link's bandwidth in Mbit/s")
    add("--latency", type=positive(float, or_zero=True), default=20.0, metavar="MS",
        help="deployment estimate: round-trip time between two parties in ms (20: a hospital and a cloud server in one "
             "region; 0.5: one LAN); every transfer waits half of it")
    add("--client-tflops", type=positive(float), default=5.0, metavar="X", help="deployment estimate: a client's TFLOP/s")
    add("--server-tflops", type=positive(float), default=50.0, metavar="X", help="deployment estimate: the server's TFLOP/s")
    distributed.add_flags(parser, positive)
    add = parser.add_argument_group("output", "files written as each scheme ends").add_argument
    add("--json", metavar="PATH", help="write every row as JSON (rewritten as each row ends)")
    add("--csv", metavar="PATH", help="write every row as CSV (rewritten as each row ends)")
    add("--save", metavar="DIR", help="write each scheme's deployed model per site (DIR/SCHEME/site-K.pt, model.json), "
                                      "DIR/results.json and each round's checkpoint, as each scheme ends")
    add("--resume", metavar="DIR", help="go on with a run saved with --save DIR that was interrupted (its other flags "
                                        "again): finished schemes kept, the interrupted one from its last round")
    add("--plot", metavar="PATH.png", help="draw AUROC per round and final AUROC against total bytes (needs [plot])")
    args = parser.parse_args(argv)
    check(args, parser)
    for flag, folder, cannot in estimates.unwritable(args):  # (found now, not after hours of training)
        parser.error(f"{flag}: cannot write into {folder} ({cannot})")
    return args, parser


def check(args, parser):
    """The flags that cannot go together, and the defaults that depend on others, each refused in one line (exit 2)."""
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
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.resume and args.save and os.path.abspath(args.save) != os.path.abspath(args.resume):
        parser.error(f"--resume {args.resume} saves where it resumes; --save {args.save} is elsewhere")
    args.save = args.resume or args.save
    untrained = args.costs_only and "--costs-only trains none"
    refused = [
        (not args.schemes, f"--defense: no scheme takes {' and '.join(name.replace('_', '-') for name in named)} at once"),
        ("dp" in named and args.clip == math.inf and dict(args.defense)["dp"],
         "--defense dp:SIGMA adds noise of SIGMA x --clip: it needs a finite --clip"),
        ("gradient_noise" in named and not args.label_private,
         "--defense gradient-noise: only a --label-private client returns gradients to the server"),
        (args.tradeoff and untrained, f"--tradeoff measures trained models; {untrained}"),
        (args.device == "cuda" and not torch.cuda.is_available(), "--device cuda: no CUDA device is available"),
        (args.profile and untrained, "--profile times training; it cannot go with --costs-only"),
        (args.inversion_curve and (args.costs_only or args.distributed),
         "--inversion-curve trains one client in this process: not with --costs-only or --distributed"),
        ((args.attack or args.cuts_sweep) and untrained, f"--attack and --cuts-sweep need trained models; {untrained}"),
        (args.distributed and (args.label_private or args.cuts_sweep),
         "--distributed runs the schemes as they are: --label-private and --cuts-sweep run in the simulation"),
        (args.save and untrained, f"--save keeps trained models; {untrained}"),
        *distributed.refused(args),
        *((path and os.path.isdir(path), f"{flag} {path} is a folder; it names the file to write")
          for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot))),
        (args.save and os.path.exists(args.save) and not os.path.isdir(args.save),
         f"--save {args.save} is a file; it names a folder to write into"),
        ((args.site_sizes or args.same_scanner) and args.data,
         f"{'--site-sizes' if args.site_sizes else '--same-scanner'} is for the synthetic federation, not --data"),
        (args.site_sizes and args.sites and args.sites != len(args.site_sizes),
         f"--sites {args.sites} but --site-sizes lists {len(args.site_sizes or [])} sites"),
        (args.rounds > MAX_ROUNDS,
         f"--rounds {args.rounds}: at most {MAX_ROUNDS} (a typo guard; a run that long wants --save and --resume)"),
        (args.image_size < data.MIN_IMAGE_SIZE,  # the least that leaves DenseNet-121 1x1 pixels at its last cut
         f"--image-size: image size {args.image_size} is too small for DenseNet-121 (at least {data.MIN_IMAGE_SIZE} "
         f"pixels)"),
        estimates.too_small_a_batch(args.batch_size, args.image_size)]
    for broken, message in refused:
        if broken:
            parser.error(message)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install -e \".[plot]\"")


def site_sizes(args):
    """The number of images of each site of the run's federation (a folder's, or the synthetic one's)."""
    if args.data:
        return list(data.site_sizes(args.data).values())
    return args.site_sizes or data.default_site_sizes(args.sites or data.NUM_SITES)


def load_sites(args, only_site=None):
    """(train_sets, test_sets) of the run's federation, synthetic or from --data (with --costs-only their shapes only);
    `only_site`: a client's own in a distributed run, (train set, test set), made or read alone (a folder of one site
    is that client's own)."""
    if args.data is None:
        sites = data.synthetic_sites(num_sites=len(site_sizes(args)), image_size=args.image_size, site_sizes=args.site_sizes,
                                     seed=args.data_seed, shapes_only=args.costs_only, same_scanner=args.same_scanner,
                                     only_site=only_site)
    elif only_site is not None and len(data.site_names(args.data)) == 1:
        sites, only_site = data.folder_sites(args.data, image_size=args.image_size, seed=args.data_seed,
                                             max_pixels=args.max_pixels), 0
    else:
        sites = data.folder_sites(args.data, image_size=args.image_size, num_sites=args.sites, partition=args.partition,
                                  seed=args.data_seed, only_site=only_site, max_pixels=args.max_pixels)
        if args.costs_only:  # counting needs the shapes only
            sites = [[data.Site(s.images.to("meta"), s.labels, s.name) for s in sets] for sets in sites]
    return sites if only_site is None else tuple(sets[only_site] for sets in sites)


def defenses(args, scheme):
    """The defenses `scheme` trains under: the --defense ones together; with --tradeoff, none, then each defense that
    applies to it alone at each strength of its ladder (or at each --defense point). dp clips to --clip and reports ε
    at --delta."""
    with_dp = lambda points: Defense(**dict(points), **(dict(clip=args.clip, delta=args.delta) if "dp" in dict(points) else {}))
    if not args.tradeoff:
        return [with_dp(args.defense)]
    points = args.defense or [(name, strength) for name, ladder in LADDER.items()
                              if name != "gradient_noise" or args.label_private for strength in ladder]
    return [Defense()] + [with_dp([(name, strength)]) for name, strength in points if scheme in APPLIES[name]]


def jobs(args):
    """Every (seed, scheme, defense) the run trains, in order."""
    return [(seed, scheme, defense) for seed in range(args.seeds) for scheme in args.schemes
            for defense in defenses(args, scheme)]


def job_row(args, seed, scheme, defense):
    return dict(scheme=scheme, seed=seed, bn=args.bn, order=args.order, defense=str(defense))


def attempt(what, function, failed, say):
    """`function()`, run after training: if it raises, the one-line cause goes to `failed[what]` and is printed, and
    None is returned, so that a failing measurement never loses what training computed."""
    try:
        return function()
    except PartyFailed:
        raise
    except Exception as error:
        failed[what] = one_line(error)
        say(f"{what} failed: {failed[what]}", flush=True)
        return None


def train_scheme(args, row, defense, sites, transport, rank, warm_up, attempting, log):
    """One scheme trained from its seed's initial weights under the hooks the flags ask for, in the order the run calls
    them (`common.Run`): the transport first (the others see what arrived), the client's defense and any poison before
    the aggregator's checks, the privacy measures before the checkpoint (which saves them), the profile last. Returns
    (its result, its profile or None). `attempting(what, function)` runs each measurement; `log` takes each round's
    line of progress."""
    scheme, screen = row["scheme"], Screen(args.max_update_ratio)
    hooks = ([transport] if transport else []) + ([defense] if defense and scheme in SPLIT_SCHEMES + UPLOADING else [])
    hooks += [Poison(*planted) for planted in args.poison] + [screen]
    if args.costs_only:
        hooks.append(CostsOnly())
    else:  # what each party receives, recorded as it arrives, then measured after each round
        recorder = privacy.Recorder(sites[0], args.batch_size, row["seed"])
        hooks += [recorder, privacy.Measures(recorder, args.attack_steps if args.attack else 0, attempting)]
    if args.save:  # after every round: DIR/SCHEME/checkpoint.pt (`--resume`), or each party's own
        hooks.append(Checkpoint(resume.fresh_checkpoint(row, args, rank if transport else None), transport,
                                keep=[*([transport] if transport else []), screen], noted=dict(defense=row["defense"])))
    profile = profiler.Profile(args.device) if args.profile else None
    if transport:
        transport.begin(scheme)  # from here on: this party's busy time and peak memory for the scheme
    torch.manual_seed(row["seed"])
    client_model, server_model = split_densenet121(args.cut)
    image_shape, split = sites[0][0].images.shape[1:], {}
    if args.label_private and scheme in SPLIT_SCHEMES:
        client_model, server_model = labelprivate.label_private(client_model, server_model)
        split = dict(step=labelprivate.step)
    if args.costs_only:
        client_model, server_model = cost_only(client_model, server_model, image_shape)
    if transport:
        client_model, server_model = transport.parts(client_model, server_model, image_shape)
    if not args.costs_only:  # (untimed: the process's first kernels run here, not in the first round)
        parts = [client_model, server_model] + ([client_model.head] if split else [])
        warm_up(parts if scheme in SPLIT_SCHEMES else [nn.Sequential(client_model, server_model)], sites[0],
                args.batch_size, args.device, args.bf16, args.layout == "channels-last")
    with profile.measure() if profile else contextlib.nullcontext():
        result = SCHEMES[scheme](client_model, server_model, *sites, rounds=args.rounds, batch_size=args.batch_size,
                                 lr=args.lr, seed=row["seed"], bf16=args.bf16, bn=args.bn, order=args.order,
                                 device=args.device, channels_last=args.layout == "channels-last",
                                 hooks=hooks + ([profile] if profile else []), log=log, **split)
    return result, profile


def run_job(args, seed, scheme, defense, sites, transport, rank, finished, say, estimate, warm_up):
    """One row of the table: `scheme` trained from `seed`'s weights under `defense` (or kept, if a resumed run
    finished it), then measured and saved. Returns (row, its profile line or None, and for the cuts sweep site
    0's deployed model, if the scheme is one that sweeps)."""
    row = job_row(args, seed, scheme, defense)
    failed, row_say = {}, lambda line, **options: say(f"{report.name(row)}: {line}", **options)
    sweeps = args.cuts_sweep and scheme in SPLIT_SCHEMES + ("central",)
    if (scheme, seed, row["defense"]) in finished:
        row_say(f"finished before: kept from {args.save}", flush=True)
        return (finished[scheme, seed, row["defense"]], None,
                report.load_site_model(os.path.join(report.save_folder(row, args), "site-0.pt")) if sweeps else None)
    estimate.job_started()
    try:
        result, profile = train_scheme(args, row, defense, sites, transport, rank, warm_up,
                                       lambda what, function: attempt(what, function, failed, row_say),
                                       lambda line: (say(line, flush=True), estimate.round_ended()))
    except PartyFailed as error:
        distributed.stop(rank, str(error))
    except Exception as error:  # one scheme failing never loses the rows already finished
        if transport:  # ... but the other parties cannot go on without this one: all stop, with the cause
            transport.fail(f"{distributed.party_name(rank)}: {scheme}: {one_line(error)}")
        row["error"] = one_line(error)
        say(f"{scheme} failed: {row['error']}", flush=True)
        estimate.job_ended()
        return row, None, None
    models = result.pop("models")
    parallel = scheme in PARALLEL
    row.update(result, parallel=parallel, deploy_seconds=estimates.deployment_seconds(
        result, parallel, args.bandwidth, args.client_tflops, args.server_tflops, args.latency))
    sigma = defense.dp  # ε: client-level DP of the uploads, where they are noised
    row.update(epsilon=epsilon(sigma, args.rounds, defense.delta) if sigma else None, delta=defense.delta if sigma else None)
    if args.costs_only:
        row["seconds"] = None
    line = profile and attempt("profile", lambda: profile.row(row, report.human), failed, row_say)
    if args.save:  # each party the models it holds (under --distributed: a site its own), the server model.json
        attempt("save", lambda: report.save_models(models, row, sites[0], args, args.label_private
                                                   and scheme in SPLIT_SCHEMES, describe=rank == 0), failed, row_say)
    labels_leave = scheme == "central" or (scheme in SPLIT_SCHEMES and not args.label_private)
    lines, worst = privacy.worst_leaks(row["history"])
    row.update(privacy=privacy.what_the_server_learns(row["history"], SENDS.get(scheme, "activations"), labels_leave),
               leak=lines, leak_worst=worst)
    if failed:  # (besides what the run itself reports: a checkpoint that could not be written)
        row["failed"] = {**row.get("failed", {}), **failed}
    estimate.job_ended()
    return row, line, models[0] if sweeps else None


def main(argv=None):
    """Run the bench; returns the rows the table shows (one per scheme and seed).

    A scheme that fails keeps the other rows; a measurement after training that fails (a privacy measure, saving, the
    sweep, the plot) keeps its row, marked where its column is (the row's "failed"). Each failure ends as one line on
    stderr, and, run from the command line, the exit status is then 1.
    """
    args, parser = parse_args(argv)
    checkpoints.writer.wait()  # (an interrupted run earlier in this process: its last checkpoint is written first)
    profiler.set_determinism(args.deterministic)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.provision or args.inversion_curve:  # (tasks of their own, with no federation to train)
        return provision(args, parser) if args.provision else inversion_curve(args)
    if "RANK" not in os.environ:  # this process starts the run (not a party that torchrun or launch.py started)
        refuse_what_cannot_fit(args, parser)
        if args.distributed:  # every party its own process, here; rank 0 prints the table
            return spawn(sys.argv[1:] if argv is None else argv, args, parser)
    transport, sites = join(args, parser)
    rank = transport.rank if transport else 0  # (the server's process prints; a simulation is all of it)
    say = print if rank == 0 else silent
    rows, profiles, sweep, failed = run_jobs(args, sites, transport, rank, say, parser)
    if transport:
        transport.close()
        if rank != 0:
            return rows
    report.print_tables(rows, args, transport is not None)
    if sweep:
        attacks.sweep_experiment(*sweep, sites[0], args.batch_size, args.attack, args.attack_steps, args.plot,
                                 lambda what, function: attempt(what, function, failed, say))
    if any(profiles):
        print(f"\nwhere training time goes ({args.device}):")
        print(report.align([["scheme", "images/s", *profiler.Profile.PARTS, "other", "peak memory"]]
                           + list(filter(None, profiles))))
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


def run_jobs(args, sites, transport, rank, say, parser):
    """Every job of the run in turn (`run_job`), the files rewritten as each row ends: (rows, their profile lines,
    the model the cuts sweep takes, what failed outside the rows)."""
    refuse = (lambda message: transport.fail(f"server: {message}")) if transport else parser.error
    finished = resume.kept_rows(args, [job_row(args, *job) for job in jobs(args)], refuse, say, transport)
    rows, profiles, sweep, failed = [], [], None, {}  # failed: what failed outside the rows, and why
    if args.save and rank == 0:
        attempt("writing run.json", lambda: report.write_json(resume.run_settings(args), os.path.join(args.save, "run.json")),
                failed, say)
    say(f"sites: {', '.join(f'{s.name} {len(s)}+{len(t)}' for s, t in zip(*sites))} (train+test images), "
        f"{args.image_size}px, cut {args.cut}, device {args.device}"
        + (f", {transport.world_size} processes" if transport else ""), flush=True)
    estimate = estimates.Estimate(len(jobs(args)) - len(finished), args.rounds, say if not args.costs_only else silent)
    warm_up = profiler.WarmUp()
    for seed, scheme, defense in jobs(args):
        row, profile, model = run_job(args, seed, scheme, defense, sites, transport, rank, finished, say, estimate,
                                      warm_up)
        rows.append(row)
        profiles.append(profile)
        if sweep is None and model is not None:
            sweep = scheme, model
        report.add_ratios(rows)
        if rank == 0:
            attempt("writing the results", lambda: report.write_outputs(rows, args), failed, say)
    return rows, profiles, sweep, failed


def refuse_what_cannot_fit(args, parser):
    """A run that cannot fit in this machine's memory (`estimates.check_memory`) is refused before anything starts."""
    if not args.costs_only:
        try:
            too_big = estimates.check_memory(args, site_sizes(args), report.human)
        except ValueError as error:
            too_big = str(error)
        if too_big:
            parser.error(too_big)


def spawn(argv, args, parser):
    """--distributed without torchrun: every party a process of this machine (`launch.parties`); rank 0's rows."""
    if args.resume:  # refused here, in one line, before any party starts
        resume.resumable(args, [job_row(args, *job) for job in jobs(args)], parser.error, silent, rank=0)
    try:
        if args.key:  # so are kits of two federations (a party would stop at its first handshake)
            secure.check_kits(args.key, len(site_sizes(args)) + 1)
        return launch.parties(__file__, argv, len(site_sizes(args)) + 1, args.key, args.threads, args.max_restarts,
                              args.json)
    except ValueError as error:
        parser.error(str(error))


def join(args, parser):
    """(transport, sites) of this process: none and every site in a simulation; under --distributed, its party's
    transport, its own site and the others' shapes (`distributed.join`)."""
    try:
        if args.distributed:
            transport, sites = distributed.join(args, parser.error, lambda site: load_sites(args, only_site=site))
        else:
            transport, sites = None, load_sites(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if any(site >= len(sites[0]) for site, _ in args.poison):
        parser.error(f"--poison: there are {len(sites[0])} sites, numbered from 0")
    return transport, sites


def inversion_curve(args):
    """--inversion-curve (`inversion.curve_experiment`): its rows."""
    try:
        return inversion.curve_experiment(load_sites(args)[0], args.cut, args.lr, args.attack_steps, args.json)
    except OSError as error:
        print(f"bench.py: error: {error}", file=sys.stderr)
        sys.exit(1)


def provision(args, parser):
    """--provision DIR: one kit per party (`secure.provision`); returns no rows."""
    try:
        paths = secure.provision(args.provision, len(site_sizes(args)) + 1)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(f"kits for {len(paths)} parties in {args.provision}: {', '.join(map(os.path.basename, paths))}; "
          f"each party's machine gets its own alone (docs/distributed.md)")
    return []


def terminated(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def cli():
    """`python bench.py`: Ctrl-C ends the run with one line (what is saved stays, and says how to go on), not a
    traceback. A party of a distributed run lets it through, to its excepthook, which stops the others too."""
    if "RANK" not in os.environ:  # SIGTERM (a scheduler's, `kill`'s) ends the run as Ctrl-C does
        signal.signal(signal.SIGTERM, terminated)
    try:
        main()
    except KeyboardInterrupt as interrupted:
        if "RANK" in os.environ:
            raise
        by_sigterm = interrupted.args == ("SIGTERM",)
        saved = next((sys.argv[i + 1] for i, flag in enumerate(sys.argv[:-1]) if flag in ("--save", "--resume")), None)
        print(f"bench.py: {'stopped (SIGTERM)' if by_sigterm else 'interrupted'}"
              + (f"; go on with the same flags and --resume {saved}" if saved else ""), file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGTERM if by_sigterm else 130)
    # Done, every file closed and every checkpoint written: leave without Python's own clean-up of torch and what it
    # imports, which a distributed run would wait for in each of its parties.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    cli()
