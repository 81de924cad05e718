"""What a run will take before it has run, or on a machine it does not run on: memory (`check_memory`), a batch
BatchNorm can train (`too_small_a_batch`), folders it can write (`unwritable`), the time left (`Estimate`), the time
on a real network (`deployment_seconds`), and how long a party may wait for another (`schedule_timeout`). Each is
a model of the run, stated in its docstring; docs/bench.md says how to read them."""
import contextlib
import math
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from common import training_flops
from densenet_split import split_densenet121


def weightless_densenet(cut):
    """DenseNet-121, split at `cut` and joined again, on the meta device: shapes and sizes without weights."""
    with torch.device("meta"):
        return nn.Sequential(*split_densenet121(cut))


def memory_needed(cut, image_size, batch_size, site_sizes, channels=1, processes=False):
    """About the most memory a run of these settings holds at once, by part, in bytes: the images (twice: centralized
    training pools a copy), the activations autograd keeps for one mini-batch's backward (measured on the meta device),
    per site a model copy training with Adam, its deployed copy and the server's copy for it (9 copies' worth of the
    weights), and with `processes` (a distributed run) about 0.5 GB per process (Python, torch)."""
    model, saved = weightless_densenet(cut), {}

    def keep(tensor):
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(torch.empty(max(batch_size, 2), channels, image_size, image_size, device="meta")).sum()
    weights = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    return dict(images=2 * sum(site_sizes) * channels * image_size ** 2 * 4, activations=sum(saved.values()),
                models=9 * len(site_sizes) * weights, processes=int(0.5e9) * (len(site_sizes) + 1) if processes else 0)


def memory_available(device):
    """(bytes this run may use on the training device, on the host): free GPU memory, and the host's MemAvailable
    (Linux; None where it cannot be read)."""
    host = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as file:
            host = 1024 * int(next(line for line in file if line.startswith("MemAvailable:")).split()[1])
    return (torch.cuda.mem_get_info()[0] if device == "cuda" else host), host


def check_memory(args, site_sizes, human):
    """Why a run of these settings cannot fit in this machine's memory (`memory_needed`), in one line with the
    estimate; None where it fits. `human` writes bytes."""
    needed = memory_needed(args.cut, args.image_size, args.batch_size, site_sizes, processes=args.distributed)
    on_device, on_host = memory_available(args.device)
    checks = ([("the GPU's", needed["activations"] + needed["models"], on_device),
               ("this machine's", needed["images"] + needed["processes"], on_host)] if args.device == "cuda"
              else [("this machine's", sum(needed.values()), on_host)])
    for what, part, available in checks:
        if available is not None and part > available:
            parts = ", ".join(f"{name} {human(value, 'B')}" for name, value in needed.items() if value)
            return (f"{len(site_sizes)} sites, {args.image_size} px, batch {args.batch_size}: about {human(part, 'B')} "
                    f"needed ({parts}), {human(available, 'B')} of {what} memory free")
    return None


def schedule_timeout(cut, train_sets, test_sets):
    """The longest a party may wait for another, generously: one round of every party's work (training, and for
    bn="local" the statistics pass and scoring: about 1.5 times the training FLOPs) at 5 GFLOP/s, plus a minute."""
    per_image = training_flops(weightless_densenet(cut), tuple(train_sets[0].images.shape[1:]))
    images = sum(len(s) for s in train_sets) + sum(len(s) for s in test_sets)
    return 60 + 1.5 * per_image * images / 5e9


def deployment_seconds(row, parallel, bandwidth_mbit, client_tflops, server_tflops, latency_ms):
    """Estimated time to run the scheme for real: compute at the stated speeds, transfers at the stated bandwidth, and
    every transfer's wait for the other side: one one-way delay (half the round-trip time).

    Sequential turns (split learning, SplitFed v2): everything adds up. Parallel clients (`parallel`: FedAvg, SplitFed
    v1/v3, the centralized upload): the slowest client sets the pace; client work and activations (their bytes and
    their transfers) scale with a site's images, so the largest site's share is max(n)/sum(n), and each client moves
    1/K of the weights, in 1/K of the weight transfers.
    """
    sizes = row["num_examples"]
    share, weight_share = (max(sizes) / sum(sizes), 1 / len(sizes)) if parallel else (1.0, 1.0)

    def on_the_critical_path(per_link):  # bytes or transfers
        return ((per_link["client->server"] + per_link["server->client"]) * share + per_link["client->client"]
                + (per_link["client->aggregator"] + per_link["aggregator->client"]) * weight_share)

    flops = row["flops"]
    compute = (flops["client"] * share / client_tflops + (flops["server"] + flops["aggregator"]) / server_tflops) / 1e12
    transfer = on_the_critical_path(row["bytes"]) * 8 / (bandwidth_mbit * 1e6)
    return compute + transfer + on_the_critical_path(row["messages"]) * latency_ms / 2e3


def duration(seconds):
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Estimate:
    """How long the run will take, from what it measured and never before: after the first round it trains, that
    round's wall time (the scheme's set-up and the round's evaluation included) for every round of every scheme (they
    all train the same FLOPs); after each scheme, the mean wall time of the schemes done for each one left, which
    picks up what FLOPs do not tell (copies, averaging, the privacy measures)."""

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


def last_side(image_size):
    """The side of DenseNet-121's last dense block at `image_size` px: conv0 and pool0 halve it rounding up, each
    transition's average pooling rounding down."""
    return math.ceil(math.ceil(image_size / 2) / 2) // 8


def too_small_a_batch(batch_size, image_size):
    """(broken, why) for bench.py's checks: a batch too small for BatchNorm to train at DenseNet-121's last block,
    where it needs two values a channel (an image too small for any block is refused as such, elsewhere)."""
    side = max(last_side(image_size), 1)
    return (batch_size * side ** 2 < 2,
            f"--batch-size {batch_size}: BatchNorm cannot train on one value a channel, and DenseNet-121's last block "
            f"is {side}x{side} at {image_size} px: at least {math.ceil(2 / side ** 2)}")


def unwritable(args):
    """(flag, folder, why) for each folder the run will write into that cannot be written: --save's, and those of
    --json, --csv and --plot (made if missing; a file is made there and removed: a read-only file system, full
    inodes or missing permission show now, not after hours of training)."""
    folders = [("--save", args.save), *((flag, path and (os.path.dirname(path) or "."))
                                        for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)))]
    found = []
    for flag, folder in folders:
        try:
            if folder:
                os.makedirs(folder, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    pass
        except OSError as error:
            found.append((flag, folder, error.strerror or str(error)))
    return found
