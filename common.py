"""What every scheme shares: the run's settings, seeded batches, the cost ledger, evaluation and AUROC.

A scheme makes one `Run`, counts on it at the line where work or a transfer happens
(`run.send(source, destination, *tensors)`, `run.compute(party, flops)`), calls `run.end_round(models)` after
each round and returns `run.result(models)`. A party is a client (its site's index), "server" or "aggregator". With `costs_only=True`, `densenet_split.cost_only` stand-ins for the model
parts and images on the meta device, the same loop runs without arithmetic and counts exactly what training
counts: that is how `bench.py --costs-only` predicts costs at any scale.
"""
import contextlib
import copy
import math
import os
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densenet_split import is_label_private, meta_copy, nbytes, output_shape

LINKS = ("client->server", "server->client", "client->client", "client->aggregator", "aggregator->client")
PARTIES = ("client", "server", "aggregator")
DEFAULTS = dict(rounds=3, batch_size=32, lr=1e-3, device=None, seed=0, bf16=False, bn="local", log=print,
                costs_only=False, channels_last=True, transport=None, order="fixed", defense=None,
                observe=None, checkpoint=None)
BN_SETTINGS = ("local", "averaged")
ORDERS = ("fixed", "shuffled")


def one_line(error):
    """An exception as one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def auroc(scores, labels):
    """Area under the ROC curve: the chance that a positive outscores a negative, ties counting one half
    (Mann-Whitney U with average ranks). None when the labels hold one class only (not defined)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0.5
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    if num_pos == 0 or num_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank of each distinct score, ties averaged
    rank_sum = average_rank[inverse][positive].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def auroc_interval(scores, labels, level=0.95, num_resamples=2000, seed=0):
    """A (low, high) percentile interval for `auroc`: a bootstrap that resamples positives and negatives
    apart (stratified, so each resample keeps the test set's class counts), seeded. None for one class.

    AUROC is the mean over (positive, negative) pairs of `wins` (1 if the positive scores higher, 1/2 on a
    tie), so a resample that draws each positive a times and each negative b times has AUROC a @ wins @ b
    over the number of pairs: every resample is two small matrix products, no sorting.
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0.5
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    rng = np.random.default_rng(seed)
    draws_pos = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=num_resamples)
    draws_neg = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=num_resamples)
    resampled = ((draws_pos @ wins) * draws_neg).sum(1) / (len(pos) * len(neg))
    low, high = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@contextlib.contextmanager
def batchnorm_statistics(*models):
    """Recompute BatchNorm running statistics from the forward passes run inside the block.

    Inside, `models` are in train mode and every BatchNorm layer notes the mean and variance of what it
    sees in each batch; on leaving, its running statistics become the exact mean and unbiased variance,
    per channel, over all of it: the same as one pass with `momentum=None` over all the images in one
    batch, without needing them in memory at once. The batches are pooled exactly (in float64, the
    variance within batches plus the variance between their means), each weighted by its number of
    values, where momentum=None would weigh every batch alike whatever its size. The weights are
    untouched; the models are left in eval mode.
    """
    layers = [m for model in models for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seen = {layer: [] for layer in layers}  # per batch: number of values per channel, variance, mean

    def note(layer, inputs):
        x, dims = inputs[0].float(), [0, *range(2, inputs[0].dim())]
        mean = x.mean(dims, keepdim=True)  # two passes (mean, then squares about it): exact, and on this CPU
        variance = (x - mean).square().mean(dims)  # ten times faster than torch.var_mean
        seen[layer].append((x.numel() // x.shape[1], variance, mean.flatten()))

    hooks = [layer.register_forward_pre_hook(note) for layer in layers]
    for model in models:
        model.train()
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for layer, batches in seen.items():
            if not batches:
                continue
            counts = torch.tensor([count for count, _, _ in batches], dtype=torch.float64, device=layer.running_mean.device)
            variances, means = (torch.stack([batch[i] for batch in batches]).double() for i in (1, 2))
            total = counts.sum()
            mean = counts @ means / total
            sum_of_squares = counts @ variances + counts @ (means - mean) ** 2
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(sum_of_squares / max(total - 1, 1))
    for model in models:
        model.eval()


@torch.no_grad()
def recompute_batchnorm(model, batches, autocast=contextlib.nullcontext):
    """`model` with BatchNorm statistics recomputed over `batches` of (images, labels) (`batchnorm_statistics`),
    in eval mode."""
    with batchnorm_statistics(model):
        for images, _ in batches:
            with autocast():
                model(to_model(images, model))
    return model


def batch_bounds(num_examples, batch_size):
    """(start, end) of each mini-batch. A lone last example joins the batch before it: BatchNorm cannot
    train on one image at 1x1 pixels."""
    ends = list(range(batch_size, num_examples, batch_size)) + [num_examples]
    if len(ends) > 1 and ends[-1] - ends[-2] == 1:
        del ends[-2]
    return list(zip([0] + ends[:-1], ends))


def to_model(tensor, model):
    """`tensor` where `model` computes: on its device and, if floating point, in its dtype. Every function that
    puts data through a model it did not place itself calls this, so that a model trained on a GPU (or kept
    in another dtype) is measured, scored and saved where it is."""
    weight = next(model.parameters())
    return tensor.to(device=weight.device, dtype=weight.dtype if tensor.is_floating_point() else tensor.dtype)


def party_kind(party):
    """"client" for a client (a site index), else the party's own name ("server", "aggregator")."""
    return "client" if isinstance(party, int) else party


def tensors(dataset):
    """(images, labels) of a site: a `data.Site`'s own tensors, or any dataset's items stacked."""
    if hasattr(dataset, "images"):
        return dataset.images, dataset.labels
    return torch.stack([item[0] for item in dataset]), torch.tensor([float(item[1]) for item in dataset])


def tree_map(function, objects):
    """`objects` (tensors in tuples, lists and dicts, as `run.send` takes them) with every tensor mapped."""
    if isinstance(objects, torch.Tensor):
        return function(objects)
    if isinstance(objects, dict):
        return {key: tree_map(function, value) for key, value in objects.items()}
    if isinstance(objects, (list, tuple)):
        return type(objects)(tree_map(function, value) for value in objects)
    return objects


def leaves(objects):
    found = []
    tree_map(found.append, objects)
    return found


def pack(state):
    """The tensors of `state` (a state dict, nested), flattened and joined into one new tensor per dtype, where
    they are: a checkpoint of a few large tensors saves and loads many times faster than one of thousands."""
    by_dtype = {}
    for tensor in leaves(state):
        by_dtype.setdefault(str(tensor.dtype), []).append(tensor.detach().reshape(-1))
    return {dtype: torch.cat(parts) for dtype, parts in by_dtype.items()}


def unpack(packed, like):
    """`like` (a state dict shaped as the one `pack` packed) with the packed values, in the same order."""
    used = dict.fromkeys(packed, 0)

    def take(tensor):
        dtype, start = str(tensor.dtype), used.get(str(tensor.dtype), 0)
        used[dtype] = start + tensor.numel()
        if dtype not in packed or used[dtype] > packed[dtype].numel():
            raise ValueError("the checkpoint holds other model parts")
        # in the memory layout of `like`'s tensor (channels-last, say): fused Adam pairs a weight's elements
        # with its moments' by their place in memory
        return torch.empty_like(tensor, device="cpu").copy_(packed[dtype][start:used[dtype]].view(tensor.shape))
    state = tree_map(take, like)
    if any(used[dtype] != values.numel() for dtype, values in packed.items()):
        raise ValueError("the checkpoint holds other model parts")
    return state


def previous(path):
    """Where the checkpoint before `path`'s is kept, when one is (`save_checkpoint(keep_previous=True)`)."""
    return path.removesuffix(".pt") + ".previous.pt"


def save_checkpoint(checkpoint, path, keep_previous=False):
    """`torch.save` atomically: into a temporary file beside `path`, flushed to the disk, then renamed over it,
    so that a kill or a power cut during the write leaves the previous checkpoint whole. `keep_previous`: the
    one it replaces is kept as `previous(path)` (a party of a distributed run may have to go back a round)."""
    temporary = f"{path}.tmp"
    os.makedirs(os.path.dirname(temporary) or ".", exist_ok=True)
    with open(temporary, "wb") as file:
        torch.save(checkpoint, file)
        file.flush()
        os.fsync(file.fileno())
    if keep_previous and os.path.exists(path):
        os.replace(path, previous(path))
    os.replace(temporary, path)


class CheckpointWriter:
    """Writes checkpoints while training goes on: `write` takes a checkpoint whose tensors nothing changes
    afterwards (`pack` makes new ones), moves them to the CPU, and a thread saves it (`save_checkpoint`: on
    the disk, then renamed into place); `wait` returns when the last write is done, with its exception if it
    raised one."""

    def __init__(self):
        self.thread, self.error = None, None

    def write(self, checkpoint, path, keep_previous=False):
        self.written()
        snapshot = tree_map(lambda tensor: tensor.detach().cpu(), checkpoint)  # (containers copied too)

        def save():
            try:
                save_checkpoint(snapshot, path, keep_previous)
            except BaseException as error:  # a full disk, or an interruption: the caller's to raise
                self.error = error
        self.thread = threading.Thread(target=save, name="checkpoint")
        self.thread.start()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
        error, self.thread, self.error = self.error, None, None
        return error

    def written(self):
        """`wait`, raising what the write raised."""
        error = self.wait()
        if error:
            raise error


checkpoints = CheckpointWriter()  # one writer per process: a run's checkpoint is on the disk before the next starts


def load_checkpoint(path):
    """A checkpoint written by `save_checkpoint`, tensors on the CPU, loaded with `weights_only=True` (tensors,
    numbers, strings and containers; no code runs). A missing, partial or corrupted file: ValueError naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a whole checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"settings", "state", "history"} <= set(checkpoint):
        raise ValueError(f"{path}: not a checkpoint of a scheme's run")
    return checkpoint


_warmed_up = set()  # what `Run.warm_up` has prepared in this process


class Run:
    """One scheme's run: settings, batches, counted costs, timing and the per-round history."""

    def __init__(self, scheme, train_sets, test_sets, parallel, **cfg):
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
        self.cfg = {**DEFAULTS, **cfg}
        for name in ("rounds", "batch_size"):
            if not isinstance(self.cfg[name], int) or self.cfg[name] < 1:
                raise ValueError(f"{name} must be a positive whole number, not {self.cfg[name]!r}")
        if self.cfg["bn"] not in BN_SETTINGS:
            raise ValueError(f"bn must be one of {', '.join(BN_SETTINGS)}, not {self.cfg['bn']!r}")
        if self.cfg["order"] not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {self.cfg['order']!r}")
        self.scheme, self.train_sets, self.test_sets, self.parallel = scheme, train_sets, test_sets, parallel
        self.device = torch.device(self.cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rounds, self.batch_size, self.lr = self.cfg["rounds"], self.cfg["batch_size"], self.cfg["lr"]
        self.bytes = dict.fromkeys(LINKS, 0)
        self.messages = dict.fromkeys(LINKS, 0)  # transfers, each one a party waits for (latency)
        self.flops = dict.fromkeys(PARTIES, 0)
        self.history = []
        self.deployed = None  # each site's deployed model after the last round
        self.seconds = 0.0
        self.image_shape = tuple(train_sets[0][0][0].shape)
        self._loss_sum = torch.zeros((), device=self.device)
        self._num_losses = 0
        self._clock = None  # started by the round's first transfer or batch (`_start_clock`): set-up is not timed
        self._defended = {}  # per site: the batches defended this round (the defense's noise is seeded by it)
        self._state, self.carried = (), {}  # what a checkpoint holds besides the ledger (`restore`)
        self._deployable = {}  # each site's copy to deploy (`deploy_copy`)
        self.settings = dict(scheme=scheme, seed=self.cfg["seed"], bn=self.cfg["bn"], order=self.cfg["order"],
                             batch_size=self.batch_size, lr=self.lr, bf16=self.cfg["bf16"], defense=str(self.cfg["defense"]),
                             num_examples=[len(s) for s in train_sets], image_shape=list(self.image_shape))

    def restore(self, *state, **carried):
        """Make the run resumable: `state` (every model copy and optimizer the loop keeps across rounds) and the
        loop's own variables `carried` (their values at the start) go into the checkpoint written after every
        round (`end_round`) when the run has one (checkpoint=PATH), with the ledger, the history and the time.
        If PATH holds a checkpoint already, all of it is loaded back now, so that `rounds_to_go` goes on from
        the round after it. Returns the loop's variables as the checkpoint left them (else `carried`)."""
        self._state, self.carried = state, dict(carried)
        path, transport = self.cfg["checkpoint"], self.cfg["transport"]
        if path is None:
            return self.carried
        found = {}  # by the number of rounds done
        for saved in (path, previous(path)) if transport else (path,):
            if os.path.exists(saved):
                checkpoint = load_checkpoint(saved)
                found[len(checkpoint["history"])] = saved, checkpoint
                if len(checkpoint["history"]) > self.rounds:
                    raise ValueError(f"{saved}: {len(checkpoint['history'])} rounds done, more than {self.rounds}")
        # Under a transport every party goes on from the last round all of them have a checkpoint of (a party
        # killed during a round's write has the round before; the others keep that one too).
        done = transport.agree(found, self.rounds) if transport else max(found, default=0)
        if done == 0:
            return self.carried
        path, checkpoint = found[done]
        differs = [key for key in self.settings if checkpoint["settings"].get(key) != self.settings[key]]
        if differs or len(checkpoint["state"]) != len(state):
            raise ValueError(f"{path}: a checkpoint of another run ({', '.join(differs) or 'its model copies'} differ)")
        for holder, saved in zip(state, checkpoint["state"]):
            if saved is not None:  # None: a copy another process holds (under a transport)
                try:
                    holder.load_state_dict(unpack(saved, holder.state_dict()))
                except ValueError as error:
                    raise ValueError(f"{path}: {error}") from None
        for ledger in ("bytes", "messages", "flops"):
            getattr(self, ledger).update(checkpoint[ledger])
        self.seconds, self.history = checkpoint["seconds"], checkpoint["history"]
        self.carried.update(checkpoint["carried"])
        if transport:
            transport.load_state_dict(checkpoint["transport"])
        return self.carried

    def rounds_to_go(self):
        """The rounds (0-based) still to train: all of them, or after a restored checkpoint's last one."""
        return range(len(self.history), self.rounds)

    def _checkpoint(self):
        weights = lambda holder: holder.param_groups[0]["params"] if hasattr(holder, "param_groups") else list(holder.parameters())
        state = [None if weights(holder)[0].is_meta else pack(holder.state_dict()) for holder in self._state]
        transport = self.cfg["transport"]
        checkpoints.write(dict(settings=self.settings, state=state, bytes=self.bytes, messages=self.messages,
                               flops=self.flops, seconds=self.seconds, history=self.history, carried=self.carried,
                               transport=transport.state_dict() if transport else None),
                          self.cfg["checkpoint"], keep_previous=transport is not None)

    def _start_clock(self):
        if self._clock is None:
            self._clock = time.perf_counter()

    def send(self, source, destination, *tensors):
        """Count what goes from one party to another (tensors, state dicts, optimizer state) on their link,
        and return it as the destination holds it.

        In one process (a simulation) that is the same objects. With a transport (`distributed.py`, one
        process per party) the source's process sends them and the destination's receives them, into the
        given tensors where they are real (a state dict lands in its model) and into new ones where they are
        placeholders; every other process gets shape-only placeholders back and carries on.
        """
        self._start_clock()
        link = f"{party_kind(source)}->{party_kind(destination)}"
        self.bytes[link] += nbytes(tensors)
        self.messages[link] += 1
        if self.cfg["transport"] is not None:
            tensors = self.cfg["transport"].send(source, destination, link, tensors)
        return tensors[0] if len(tensors) == 1 else tensors

    def compute(self, party, flops):
        self.flops[party] += flops

    def defend(self, site, images, activations):
        """What client `site` sends for `activations` under the run's defense (`privacy.Defense`: NoPeek's
        penalty, noise), its cost counted; without one, the activations themselves."""
        if not self.cfg["defense"]:
            return activations
        batch = self._defended[site] = self._defended.get(site, -1) + 1
        activations, flops = self.cfg["defense"].activations(images, activations, self._key(site, batch))
        self.compute("client", flops)
        return activations

    def defend_gradient(self, site, grad_features):
        """The gradient of the pooled features a label-private client `site` returns under the run's defense."""
        if not self.cfg["defense"]:
            return grad_features
        grad_features, flops = self.cfg["defense"].gradient(grad_features, self._key(site, self._defended[site]))
        self.compute("client", flops)
        return grad_features

    def _key(self, site, batch):
        return self.cfg["seed"], site, len(self.history), batch

    def place(self, *models):
        """Put model parts on the run's device, in training mode; channels-last where the run uses it
        (convolutions on NHWC data are faster on this CPU and on GPUs; see README). Then warm them up."""
        for model in models:
            model.to(self.device).train()
            if self.cfg["channels_last"]:
                model.to(memory_format=torch.channels_last)
        if not self.cfg["costs_only"]:
            self.warm_up(*models)

    def warm_up(self, *models):
        """One untimed training step of a copy of each model part, per batch size this run will train with:
        first kernel loads, cuDNN's choices and allocator growth happen here, so that the first scheme of a
        run does not pay them in its round 1. Once per process for each architecture, input shape, batch size
        and setting: what it prepares is the process's, and the next scheme finds it done. The parts, their
        optimizers and the random state are untouched. `models` are the parts in the order data flows through
        them (a label-private client's head last); a part held by another process (meta weights, under a
        transport) is skipped."""
        parts = [*models, models[0].head] if is_label_private(models[0]) else list(models)
        sizes = {end - start for dataset in self.train_sets for start, end in batch_bounds(len(dataset), self.batch_size)}
        shape = self.image_shape
        for index, part in enumerate(parts):
            setting = (str(part), shape, str(self.device), self.cfg["bf16"], self.cfg["channels_last"])
            cold = sorted(size for size in sizes if (setting, size) not in _warmed_up)
            if cold and not next(part.parameters()).is_meta:
                part = copy.deepcopy(part)
                optimizer = self.optimizer(part)
                for size in cold:
                    _warmed_up.add((setting, size))
                    inputs = torch.zeros(size, *shape, device=self.device, requires_grad=index > 0)
                    if self.cfg["channels_last"] and inputs.dim() == 4:
                        inputs = inputs.contiguous(memory_format=torch.channels_last)
                    with self.autocast():
                        outputs = part(inputs)
                    outputs.float().sum().backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            shape = output_shape(part, shape)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the clock starts on an idle GPU

    def copies(self, model, holders):
        """A copy of `model`, with its initial weights, for each party in `holders` (the first is `model`
        itself). With a transport a process makes real only the copies its own party holds, and meta stand-ins
        of the others (`meta_copy`): a client holds its own model and optimizer state, not every site's."""
        transport, unused, made = self.cfg["transport"], model, []
        for holder in holders:
            if transport is not None and not transport.holds(holder):
                made.append(meta_copy(model))
            else:
                made.append(unused if unused is not None else copy.deepcopy(model))
                unused = None
        return made

    def optimizer(self, model):
        """Adam for one model copy, fused (one kernel over all its weights) where the device has it.

        Its state (two moments and a step count per weight) is created now, exactly as Adam creates it at its
        first step: so that the state split learning hands on exists from the start, and weighs the same in
        a cost-only run, where no step does arithmetic.
        """
        fused = self.device.type in ("cpu", "cuda")
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, fused=fused)
        for weight in model.parameters():
            optimizer.state[weight] = dict(
                step=torch.zeros((), dtype=torch.float32, device=weight.device if fused else "cpu"),
                exp_avg=torch.zeros_like(weight, memory_format=torch.preserve_format),
                exp_avg_sq=torch.zeros_like(weight, memory_format=torch.preserve_format))
        return optimizer

    def batches(self, dataset, site, round, shuffle=True):
        """A site's mini-batches for one round, on the device, shuffled by (seed, site, round).

        Images on the meta device (a cost-only run) stay there, and so do their labels.
        """
        self._start_clock()
        images, labels = tensors(dataset)
        if shuffle:
            seed = np.random.SeedSequence([self.cfg["seed"], site, round]).generate_state(1)[0]
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(int(seed)))
            images, labels = images[order], labels[order]  # one gather per round; batches below are views
        if self.cfg["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        device = torch.device("meta") if images.is_meta else self.device
        if device.type == "cuda" and images.device.type == "cpu":  # (a distributed server's uploads are on the GPU)
            images, labels = images.pin_memory(), labels.pin_memory()
        for start, end in batch_bounds(len(labels), self.batch_size):
            yield images[start:end].to(device, non_blocking=True), labels[start:end].to(device, non_blocking=True)

    def turn_order(self, round):
        """The order in which clients take their turns in round `round` (0-based): site order (order="fixed"),
        or a permutation drawn from (seed, round), the same in every process (order="shuffled")."""
        num_sites = len(self.train_sets)
        if self.cfg["order"] == "fixed":
            return list(range(num_sites))
        seed = np.random.SeedSequence([self.cfg["seed"], round], spawn_key=(1,)).generate_state(1)[0]  # not a batch seed
        return torch.randperm(num_sites, generator=torch.Generator().manual_seed(int(seed))).tolist()

    def autocast(self):
        if not self.cfg["bf16"]:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def loss(self, logits, labels):
        """BCE-with-logits on one logit; the sum stays on the device until the round ends (no host sync)."""
        if logits.is_meta:  # a cost-only run: no value to compute, only a gradient of the logits' shape
            return logits.sum()
        loss = F.binary_cross_entropy_with_logits(logits.squeeze(1).float(), labels)
        self._loss_sum += loss.detach() * len(labels)
        self._num_losses += len(labels)
        return loss

    def end_round(self, round, models, **carried):
        """Close round `round` (0-based): time it, deploy and score each site's model, log one line, and
        write the checkpoint if the run has one (`restore`).

        `models`: each site's model as training left it; the sites deploy them as `deploy` says. `carried`:
        the loop's own variables at the round's end. With a transport, the processes do this together
        (`distributed.Transport`): rank 0 gets the numbers.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.cfg["transport"]:
            self.cfg["transport"].settle()  # the round ends when what it sent has arrived
            checkpoints.written()  # and no party passes its end before every party's last checkpoint is written
        if self._clock is not None:
            now = time.perf_counter()
            self.seconds += now - self._clock
            if self.cfg["transport"]:
                self.cfg["transport"].busy_between(self._clock, now)  # per party: its time not spent waiting
        entry = dict(round=round + 1, loss=None, seconds=self.seconds, auroc=None, auroc_interval=None,
                     site_auroc=None, accuracy=None)
        self.deployed = models
        if not self.cfg["costs_only"]:
            transport = self.cfg["transport"]
            entry["loss"] = transport.round_loss(self) if transport else (self._loss_sum / max(self._num_losses, 1)).item()
            if not math.isfinite(entry["loss"]):
                raise FloatingPointError(f"loss is {entry['loss']} in round {round + 1}")
            if transport:
                self.deployed, scores = transport.deploy_and_score(self, models)
            else:
                self.deployed = self.deploy(models)
                scores = self.score(self.deployed)
            if scores is not None:
                entry.update(self.metrics(*scores))
            if self.cfg["observe"]:  # what the server could learn from this round (`bench.py`), untimed
                entry["privacy"] = self.cfg["observe"](round, self.deployed)
        self._loss_sum.zero_()
        self._num_losses = 0
        self._defended.clear()
        self.history.append(entry)
        if self.cfg["log"]:
            score = "-" if entry["auroc"] is None else f"{entry['auroc']:.3f}"
            loss = "-" if entry["loss"] is None else f"{entry['loss']:.4f}"
            self.cfg["log"](f"{self.scheme} round {round + 1}/{self.rounds} loss {loss} auroc {score} "
                            f"elapsed {self.seconds:.1f}s")
        self._clock = None
        self.carried.update(carried)
        if self.cfg["checkpoint"] and not self.cfg["costs_only"]:
            self._checkpoint()

    def deploy(self, models):
        """What each site deploys. bn="local": a copy of its model whose BatchNorm statistics are recomputed
        on its own training images (`recompute_batchnorm`), so training goes on with `models` untouched.
        bn="averaged": `models` as they are."""
        if self.cfg["bn"] == "averaged":
            return models
        return [recompute_batchnorm(self.deploy_copy(site, model), self.batches(train_set, site, 0, shuffle=False),
                                    self.autocast) for site, (model, train_set) in enumerate(zip(models, self.train_sets))]

    def deploy_copy(self, key, model):
        """A copy of `model` to deploy as `key` (a site): made in the first round, then refreshed with `model`'s
        state (loading a DenseNet's state takes a tenth of the time of copying it); a round's deployed models
        are therefore the run's until the next round ends."""
        if key not in self._deployable:
            self._deployable[key] = copy.deepcopy(model)
        else:
            self._deployable[key].load_state_dict(model.state_dict())
        return self._deployable[key]

    @torch.no_grad()
    def score(self, models):
        """Each site's deployed model scores that site's test set: (scores, labels), one tensor per site."""
        scores, labels = [], []
        for model, test_set in zip(models, self.test_sets):
            training = model.training
            model.eval()
            with self.autocast():
                logits = [model(to_model(images, model)).float().squeeze(1).cpu()
                          for images, _ in self.batches(test_set, 0, 0, shuffle=False)]
            model.train(training)
            scores.append(torch.cat(logits))
            labels.append(tensors(test_set)[1])
        return scores, labels

    @staticmethod
    def metrics(scores, labels):
        """Pooled AUROC with its interval, each site's AUROC, accuracy at a 0.5 threshold."""
        all_scores, all_labels = torch.cat(scores), torch.cat(labels)
        return dict(auroc=auroc(all_scores, all_labels), auroc_interval=auroc_interval(all_scores, all_labels),
                    site_auroc=[auroc(s, y) for s, y in zip(scores, labels)],
                    accuracy=((all_scores > 0) == (all_labels > 0.5)).float().mean().item())

    def result(self, models):
        """The run's numbers; "models" are the deployed models of the last round, one per site."""
        checkpoints.written()  # the last round's checkpoint is on the disk before the run reports
        transport = self.cfg["transport"]
        if self.deployed is None and self.history and not self.cfg["costs_only"]:  # every round restored
            self.deployed = transport.deploy_and_score(self, models)[0] if transport else self.deploy(models)
        last = self.history[-1] if self.history else {}
        result = dict(scheme=self.scheme, bn=self.cfg["bn"], auroc=last.get("auroc"),
                      auroc_interval=last.get("auroc_interval"), site_auroc=last.get("site_auroc"),
                      accuracy=last.get("accuracy"), loss=last.get("loss"), bytes=dict(self.bytes),
                      messages=dict(self.messages), flops=dict(self.flops), seconds=self.seconds, history=self.history,
                      models=self.deployed or models, parallel=self.parallel,
                      num_examples=[len(s) for s in self.train_sets])
        if transport is not None:  # the bytes that went on the wire; the deployed models, gathered
            result.update(transport.finish(self, result["models"]))
        return result
