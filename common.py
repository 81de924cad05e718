"""What every scheme shares: the run (settings, seeded batches, the cost ledger, the seam for what watches it),
deploying and scoring each site's model, AUROC, and the counters of what a model part costs.

A scheme makes one `Run` and is one loop over `run.rounds(...)`. It counts at the line where work or a transfer
happens (`run.send(source, destination, *tensors)`, `run.compute(party, flops)`); at each round's end the sites
deploy their models (`run.deploy`), which the round's end scores (`run.end_round`). A party is a client (its
site's index), "server" or "aggregator".

What watches or changes a run from outside the loop (the transport that makes sends real, checkpoints, the
profile, the privacy measures) is an `Observer` given to the run (`observers=[...]`): the loop knows none of
them. With `costs_only=True` and stand-ins of the model parts and images on the meta device (`cost_only`), the
same loop runs without arithmetic and counts exactly what training counts: `bench.py --costs-only`.

Nothing here needs torchvision: a scheme file copied with this one trains any model.
"""
import contextlib
import copy
import math
import statistics
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__version__ = "0.1.0"
LINKS = ("client->server", "server->client", "client->client", "client->aggregator", "aggregator->client")
PARTIES = ("client", "server", "aggregator")
DEFAULTS = dict(rounds=3, batch_size=32, lr=1e-3, device=None, seed=0, bf16=False, bn="local", log=print,
                costs_only=False, channels_last=True, order="fixed", defense=None, observers=(), max_update_ratio=10.0)
BN_SETTINGS = ("local", "averaged")
ORDERS = ("fixed", "shuffled")


class Observer:
    """Something that watches or changes a run from outside its loop. A run calls each of its observers, in the
    order given, at the moments these methods name; each does nothing unless an observer overrides it.

    The transport (`distributed.Transport`) makes sends real and sums across processes; a checkpoint
    (`checkpoints.Checkpoint`) restores and saves; `bench.Profile` times; `bench.Privacy` measures what the
    server could learn.
    """

    def holds(self, party):
        """Whether this process does `party`'s work (a transport: its own party's only); the run makes real model
        copies for those alone (`Run.copies`)."""
        return True

    def started(self, run, state):
        """The loop registered `state`, the model copies and optimizers it keeps across rounds (`Run.rounds`):
        load it here to resume."""

    def round_started(self, run):
        """A round's clock started: the round began (`Run.rounds`), or a transfer before it (central's upload)."""

    def sending(self, run, source, destination, link, objects):
        """`objects` are about to go from `source` to `destination`; `link` is None for evaluation traffic,
        which the ledger does not count."""

    def sent(self, run, source, destination, link, objects):
        """`objects` went from `source` to `destination`: return them as the destination holds them (a transport:
        received there), or None to leave them as they are."""

    def summed(self, run, values):
        """`values` (numbers) summed over every process of the run, or None where this process's are the sums."""

    def round_ending(self, run):
        """The round's training is done and its clock is about to stop (a transport: its sends settle)."""

    def round_ended(self, run, entry, deployed):
        """The round's numbers (`entry`, the last of `run.history`) and each site's `deployed` model."""

    def finished(self, run, result):
        """The run's result, before the scheme returns it; update it in place."""


_warmed_up = set()  # what `warm_up` has prepared in this process


class NoDefense:
    """A run's defense when it has none (`privacy.Defense` is the real one): all is sent as it is, at no cost."""
    protects_uploads = False

    def activations(self, images, activations, key):
        return activations, 0

    def gradient(self, gradient, key):
        return gradient, 0

    def update(self, state, start, key):
        return state, 0


def checked(cfg):
    """A run's settings, `DEFAULTS` where not given; a setting that is unknown or out of range: an error naming it."""
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **cfg}
    for name in ("rounds", "batch_size"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ValueError(f"{name} must be a positive whole number, not {cfg[name]!r}")
    if not cfg["max_update_ratio"] > 0:  # (NaN is not either)
        raise ValueError(f"max_update_ratio must be positive (inf: no upload refused for its distance), not {cfg['max_update_ratio']!r}")
    for name, allowed in (("bn", BN_SETTINGS), ("order", ORDERS)):
        if cfg[name] not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {cfg[name]!r}")
    for observer in cfg["observers"]:  # (an attribute of the same name would silence a hook)
        hidden = [name for name in vars(Observer) if not name.startswith("_") and not callable(getattr(observer, name))]
        if hidden:
            raise TypeError(f"{type(observer).__name__}.{hidden[0]} hides the Observer method of that name")
    return cfg


class Run:
    """One scheme's run: settings, batches, counted costs, timing, the per-round history and its observers."""

    def __init__(self, scheme, train_sets, test_sets, parallel, **cfg):
        self.cfg = checked(cfg)
        self.scheme, self.train_sets, self.test_sets, self.parallel = scheme, train_sets, test_sets, parallel
        self.device = torch.device(self.cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.num_rounds, self.batch_size, self.lr = self.cfg["rounds"], self.cfg["batch_size"], self.cfg["lr"]
        self.observers = list(self.cfg["observers"])
        self.defense = self.cfg["defense"] or NoDefense()
        self.image_shape = tuple(train_sets[0][0][0].shape)
        # the ledger: bytes and transfers (each one a party waits for: latency) per link, FLOPs per party
        self.bytes, self.messages, self.flops = dict.fromkeys(LINKS, 0), dict.fromkeys(LINKS, 0), dict.fromkeys(PARTIES, 0)
        self.history, self.seconds, self.refused = [], 0.0, []  # refused: uploads `accepted` left out, and why
        self.holder = 0  # split learning: the site that holds the one client part (site 0 starts with it)
        self.deployed, self.deployed_sides = None, None  # each site's deployed model, and its two sides
        self._deployed_after = None  # the steps counted, and the sides deployed, when `deployed` was made
        self._steps = 0  # `compute` calls: work done since a deploy makes it stale
        self._loss_sum = torch.zeros((), device=self.device)
        self._num_losses = 0
        self._clock = None  # started by each round (or a transfer before it): set-up is not timed
        self._defended = {}  # per site: the batches defended this round (the defense's noise is seeded by it)
        self._round_starts = {}  # each model copy's state at the round's start, where a defense clips updates
        self._deploy_copies = {}  # each site's copy of each side to deploy (`refreshed`)

    # The loop's side of the run

    def place(self, *models):
        """Put model parts on the run's device, in training mode; channels-last where the run uses it
        (convolutions on NHWC data are faster on CPUs and GPUs, docs/speed.md). Then warm them up (`warm_up`)."""
        for model in models:
            model.to(self.device).train()
            if self.cfg["channels_last"]:
                model.to(memory_format=torch.channels_last)
        if not self.cfg["costs_only"]:
            warm_up(self, models)

    def copies(self, model, holders):
        """A copy of `model`, with its initial weights, for each party in `holders` (the first is `model` itself),
        real where this process holds the party (`Observer.holds`), else a meta stand-in (`meta_copy`)."""
        unused, made = model, []
        for holder in holders:
            if not all(observer.holds(holder) for observer in self.observers):
                made.append(meta_copy(model))
            else:
                made.append(unused if unused is not None else copy.deepcopy(model))
                unused = None
        return made

    def optimizer(self, model):
        """Adam for one model copy, kept across rounds (`adam`)."""
        return adam(model, self.lr, self.device)

    def rounds(self, *state):
        """The rounds (0-based) to train, each timed from its start to its `deploy`. `state`: every model copy and
        optimizer the loop keeps across rounds, handed to the observers first (`Observer.started`) so that a
        checkpoint can load it: the rounds then go on after the checkpoint's last."""
        for observer in self.observers:
            observer.started(self, state)
        for round in range(len(self.history), self.num_rounds):
            if self.defense.protects_uploads:  # a client's update is its weights minus the round's first
                self._round_starts = {id(part): copy.deepcopy(part.state_dict()) for part in state if isinstance(part, nn.Module)}
            self._start_clock()  # (already running if the loop sent something before its first round)
            yield round

    def batches(self, dataset, site, round, shuffle=True, batch_size=None):
        """A site's mini-batches (of `batch_size`, default the run's) for one round, on the device, shuffled by
        (seed, site, round). Images on the meta device (a cost-only run) stay there, as do their labels."""
        images, labels = tensors(dataset)
        if shuffle:
            order = shuffled(self.cfg["seed"], site, round, len(labels))
            images, labels = images[order], labels[order]  # one gather per round; batches below are views
        if self.cfg["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        device = torch.device("meta") if images.is_meta else self.device
        if device.type == "cuda" and images.device.type == "cpu":  # (a distributed server's uploads are on the GPU)
            images, labels = images.pin_memory(), labels.pin_memory()
        for start, end in batch_bounds(len(labels), batch_size or self.batch_size):
            yield images[start:end].to(device, non_blocking=True), labels[start:end].to(device, non_blocking=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg["bf16"] else contextlib.nullcontext()

    def loss(self, logits, labels):
        """BCE-with-logits on one logit; the sum stays on the device until the round ends (no host sync)."""
        if logits.is_meta:  # a cost-only run: no value to compute, only a gradient of the logits' shape
            return logits.sum()
        loss = F.binary_cross_entropy_with_logits(logits.squeeze(1).float(), labels)
        self._loss_sum += loss.detach() * len(labels)
        self._num_losses += len(labels)
        return loss

    def send(self, source, destination, *tensors):
        """Count what goes from one party to another (tensors, state dicts, optimizer state) on their link, and
        return it as the destination holds it: in a simulation the same objects; with a transport (a process per
        party) what the destination's process received, and shape-only placeholders in the others."""
        self._start_clock()
        link = f"{party_kind(source)}->{party_kind(destination)}"
        self.bytes[link] += nbytes(tensors)
        self.messages[link] += 1
        tensors = self._deliver(source, destination, link, tensors)
        return tensors[0] if len(tensors) == 1 else tensors

    def send_for_evaluation(self, source, destination, *objects):
        """What deploying and scoring move between parties, as `send` moves it, but not in the ledger nor the
        round's time: evaluation is measurement, not the scheme's cost."""
        objects = self._deliver(source, destination, None, objects)
        return objects[0] if len(objects) == 1 else objects

    def compute(self, party, flops):
        self.flops[party] += flops
        self._steps += 1

    def defend(self, site, images, activations):
        """What client `site` sends for `activations` under the run's defense (`privacy.Defense`: NoPeek's
        penalty, noise), its cost counted; without one, the activations themselves."""
        batch = self._defended[site] = self._defended.get(site, -1) + 1
        return self._counted(self.defense.activations(images, activations, self._key(site, batch)))

    def defend_gradient(self, site, grad_features):
        """The gradient of the pooled features a label-private client `site` returns under the run's defense."""
        return self._counted(self.defense.gradient(grad_features, self._key(site, self._defended[site])))

    def defend_upload(self, site, model):
        """What client `site` uploads of `model` for averaging: under differential privacy (`privacy.Defense`)
        its update since the round began clipped and noised, its cost counted; else its state dict."""
        return self._counted(self.defense.update(model.state_dict(), self._round_starts.get(id(model)), self._key(site, 0)))

    def deploy(self, client_sides=None, server_sides=None):
        """What each site deploys, from its own side of the model (`client_sides`: its client part, or FedAvg's
        whole model) and the server's side for it (`server_sides`: the part that serves it, or central's model).

        The round's training ends here and its clock stops: deploying and scoring are measurement, not the
        scheme's cost. bn="local": each site deploys a copy whose BatchNorm statistics are recomputed on its own
        training images (`local_statistics`); bn="averaged": the models as training left them. Returns one model
        per site, images to logits; called again with nothing trained since, the same models."""
        self._stop_clock()
        num_sites = len(self.test_sets)
        client_sides, server_sides = client_sides or [None] * num_sites, server_sides or [None] * num_sites
        made = self._steps, [id(side) for side in (*client_sides, *server_sides)]
        if made == self._deployed_after:
            return self.deployed
        local = self.cfg["bn"] == "local" and not self.cfg["costs_only"]
        sides = list(zip(client_sides, server_sides))
        if local:  # copies to deploy, so that training goes on with its own models untouched
            sides = [tuple(refreshed(self._deploy_copies, (site, side), model) for side, model in enumerate(pair))
                     for site, pair in enumerate(sides)]
        shared = num_sites > 1 and client_sides[0] is not None and all(side is client_sides[0] for side in client_sides)
        for site, (client_side, server_side) in enumerate(sides):
            if shared and site != self.holder:  # split learning: the holder's client part, copied to every site
                self.send_for_evaluation(self.holder, site, client_side.state_dict())
            if local:
                local_statistics(self, site, client_side, server_side)
        self.deployed_sides, self._deployed_after = sides, made
        self.deployed = [whole(client_side, server_side) for client_side, server_side in sides]
        return self.deployed

    def end_round(self, deployed):
        """Close the round whose models the sites deployed (`deployed`, from `deploy`): its mean training loss,
        each deployed model scoring its own site's test images (AUROC with its interval), the observers (a
        checkpoint written, the privacy measured), one line of progress."""
        if deployed is not self.deployed:
            raise ValueError("end_round scores the models that deploy returned")
        entry = dict(round=len(self.history) + 1, loss=None, seconds=self.seconds, auroc=None, auroc_interval=None,
                     site_auroc=None, accuracy=None)
        if not self.cfg["costs_only"]:
            entry["loss"] = self._round_loss()
            if not math.isfinite(entry["loss"]):
                raise FloatingPointError(f"loss is {entry['loss']} in round {entry['round']}")
            scores = score(self)
            if scores is not None:
                entry.update(metrics(*scores))
        self._loss_sum.zero_()
        self._num_losses = 0
        self._defended.clear()
        self.history.append(entry)
        for observer in self.observers:
            observer.round_ended(self, entry, deployed)
        if self.cfg["log"]:
            self.cfg["log"](progress(self.scheme, entry, self.num_rounds))

    def result(self, deployed):
        """The run's numbers and each site's `deployed` model (from `deploy`), with what the observers add (a
        transport: the bytes on the wire, the deployed models gathered at the server)."""
        if deployed is not self.deployed:
            raise ValueError("result reports the models that deploy returned")
        last = self.history[-1] if self.history else {}
        result = dict(scheme=self.scheme, bn=self.cfg["bn"], auroc=last.get("auroc"),
                      auroc_interval=last.get("auroc_interval"), site_auroc=last.get("site_auroc"),
                      accuracy=last.get("accuracy"), loss=last.get("loss"), bytes=dict(self.bytes),
                      messages=dict(self.messages), flops=dict(self.flops), seconds=self.seconds, history=self.history,
                      models=deployed, parallel=self.parallel, num_examples=[len(s) for s in self.train_sets],
                      refused=list(self.refused))
        for observer in self.observers:
            observer.finished(self, result)
        return result

    def state_dict(self):
        """What a checkpoint keeps of the run itself, besides the loop's models and optimizers."""
        return dict(bytes=self.bytes, messages=self.messages, flops=self.flops, seconds=self.seconds,
                    history=self.history, holder=self.holder, refused=self.refused)

    def load_state_dict(self, state):
        self.bytes, self.messages, self.flops = (dict(state[ledger]) for ledger in ("bytes", "messages", "flops"))
        self.seconds, self.history, self.holder, self.refused = (state[key] for key in ("seconds", "history", "holder", "refused"))

    # Inside

    def _deliver(self, source, destination, link, objects):
        """`objects` from `source` to `destination`, through the observers (`link` None: evaluation traffic)."""
        for observer in self.observers:
            observer.sending(self, source, destination, link, objects)
        for observer in self.observers:
            delivered = observer.sent(self, source, destination, link, objects)
            objects = objects if delivered is None else delivered
        return objects

    def _start_clock(self):
        if self._clock is None:
            self._clock = time.perf_counter()
            for observer in self.observers:
                observer.round_started(self)

    def _stop_clock(self):
        if self._clock is None:
            return
        for observer in self.observers:
            observer.round_ending(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self._clock
        self._clock = None

    def _key(self, site, batch):
        return self.cfg["seed"], site, len(self.history), batch

    def _counted(self, defended):
        sent, flops = defended  # what a defense sends, and its client FLOPs
        if flops:
            self.compute("client", flops)
        return sent

    def _round_loss(self):
        """The round's mean training loss, over every process of the run where it has several."""
        summed = None
        for observer in self.observers:
            summed = observer.summed(self, [self._loss_sum, self._num_losses]) or summed
        if summed is None:
            return (self._loss_sum / max(self._num_losses, 1)).item()
        return summed[0] / max(summed[1], 1)




@torch.no_grad()
def local_statistics(run, site, client_side, server_side):
    """The BatchNorm statistics of a site's deployed sides, recomputed on its own training images under the
    deployed weights (`batchnorm_statistics`); the server side's from the activations the site sends it
    (evaluation traffic)."""
    with batchnorm_statistics(*[side for side in (client_side, server_side) if side is not None]):
        for images, _ in run.batches(run.train_sets[site], site, 0, shuffle=False, batch_size=evaluation_batch(run.batch_size)):
            with run.autocast():
                forward(server_side, run.send_for_evaluation(site, "server", forward(client_side, images)))


def evaluation_batch(batch_size, images=128):
    """The batch of a statistics or a scoring pass, forward only: at least `images`, larger than training's. The
    scores in eval mode do not depend on it. The statistics do, past the first BatchNorm layer: in train mode each
    batch's own statistics normalise what the deeper layers see, and the larger the batch, the nearer that comes
    to the deployed model, which normalises by the population's (the limit, one batch of every image, is exact).
    A CPU runs both passes a third faster at 128 than at 32."""
    return max(batch_size, images)


@torch.no_grad()
def score(run):
    """Each site's deployed model scores that site's test images: (scores, labels), one tensor of each per
    site, in the process that holds them (the server's, under a transport; None in the others)."""
    scores, labels = [], []
    for site, sides in enumerate(run.deployed_sides):
        training = [(side, side.training) for side in sides if side is not None]
        for side, _ in training:
            side.eval()
        site_scores, site_labels = [], []
        for images, targets in run.batches(run.test_sets[site], 0, 0, shuffle=False, batch_size=evaluation_batch(run.batch_size)):
            with run.autocast():
                outputs, targets = run.send_for_evaluation(site, "server", forward(sides[0], images), targets)
                logits = forward(sides[1], outputs)
                if is_label_private(sides[0]):  # U-shaped: the head is the site's
                    logits = run.send_for_evaluation(site, "server", sides[0].head(run.send_for_evaluation("server", site, logits)))
            site_scores.append(logits.float().squeeze(1))
            site_labels.append(targets)
        for side, mode in training:
            side.train(mode)
        scores.append(torch.cat(site_scores))
        labels.append(torch.cat(site_labels))
    if any(site_scores.is_meta for site_scores in scores):
        return None
    return [site_scores.cpu() for site_scores in scores], [site_labels.cpu() for site_labels in labels]


def refreshed(copies, key, model):
    """`copies[key]`, a copy of `model` to deploy: made the first time, then refreshed with `model`'s state (loading a
    DenseNet's state takes a tenth of the time of copying it). No model: None."""
    if model is None:
        return None
    if key not in copies:
        copies[key] = copy.deepcopy(model)
    else:
        copies[key].load_state_dict(model.state_dict())
    return copies[key]


def progress(scheme, entry, num_rounds):
    """A round's line of progress: "sfv1 round 2/5 loss 0.5223 auroc 0.830 elapsed 7.5s"."""
    loss = "-" if entry["loss"] is None else f"{entry['loss']:.4f}"
    score = "-" if entry["auroc"] is None else f"{entry['auroc']:.3f}"
    return f"{scheme} round {entry['round']}/{num_rounds} loss {loss} auroc {score} elapsed {entry['seconds']:.1f}s"


def forward(side, inputs):
    """One side of a deployed model on `inputs` (on the side's device and dtype); no side: the inputs travel on."""
    return inputs if side is None else side(to_model(inputs, side))


def adam(model, lr, device):
    """Adam for `model`, fused (one kernel over all its weights) where the device has it.

    Its state (two moments and a step count per weight) is created now, exactly as Adam creates it at its first
    step: so that the state split learning hands on exists from the start, and weighs the same in a cost-only
    run, where no step does arithmetic.
    """
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    for weight in model.parameters():
        optimizer.state[weight] = dict(
            step=torch.zeros((), dtype=torch.float32, device=weight.device if fused else "cpu"),
            exp_avg=torch.zeros_like(weight, memory_format=torch.preserve_format),
            exp_avg_sq=torch.zeros_like(weight, memory_format=torch.preserve_format))
    return optimizer


def warm_up(run, models):
    """One untimed training step of a copy of each model part, per batch size `run` will train with: first
    kernel loads, cuDNN's choices and allocator growth happen here, so that the first scheme of a run does not
    pay them in its round 1. Once per process for each architecture, input shape, batch size and setting: what
    it prepares is the process's, and the next scheme finds it done. The parts, their optimizers and the random
    state are untouched. `models` are the parts in the order data flows through them (a label-private client's
    head last); a part held by another process (meta weights, under a transport) is skipped."""
    parts = [*models, models[0].head] if is_label_private(models[0]) else list(models)
    sizes = {end - start for dataset in run.train_sets for start, end in batch_bounds(len(dataset), run.batch_size)}
    shape = run.image_shape
    for index, part in enumerate(parts):
        setting = (str(part), shape, str(run.device), run.cfg["bf16"], run.cfg["channels_last"])
        cold = sorted(size for size in sizes if (setting, size) not in _warmed_up)
        if cold and not next(part.parameters()).is_meta:
            part = copy.deepcopy(part)
            optimizer = run.optimizer(part)
            for size in cold:
                _warmed_up.add((setting, size))
                inputs = torch.zeros(size, *shape, device=run.device, requires_grad=index > 0)
                if run.cfg["channels_last"] and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                with run.autocast():
                    outputs = part(inputs)
                outputs.float().sum().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        shape = output_shape(part, shape)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)  # the clock starts on an idle GPU


@contextlib.contextmanager
def batchnorm_statistics(*models):
    """Recompute BatchNorm running statistics from the forward passes run inside the block.

    Inside, `models` are in train mode and every BatchNorm layer notes the mean and variance of what it
    sees in each batch; on leaving, its running statistics become the exact mean and unbiased variance,
    per channel, over all of it: the same as one pass with `momentum=None` over all the images in one
    batch, without needing them in memory at once. The batches are pooled exactly (in float64, the
    variance within batches plus the variance between their means), each weighted by its number of
    values, where momentum=None would weigh every batch alike whatever its size. Each batch's mean and
    variance are the layer's own (momentum 1 for the block: its running statistics are then the last
    batch's, read after it ran), not a second pass over its inputs. The weights are untouched; the models
    are left in eval mode.
    """
    layers = [m for model in models for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seen = {layer: [] for layer in layers}  # per batch: number of values per channel, variance, mean
    momenta = {layer: layer.momentum for layer in layers}

    def note(layer, inputs, output):
        count = inputs[0].numel() // inputs[0].shape[1]  # (the running variance is unbiased: n - 1)
        seen[layer].append((count, layer.running_var * ((count - 1) / count), layer.running_mean.clone()))

    hooks = [layer.register_forward_hook(note) for layer in layers]
    for layer in layers:
        layer.momentum = 1.0
    for model in models:
        model.train()
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            layer.momentum = momenta[layer]
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


def metrics(scores, labels):
    """Pooled AUROC with its interval, each site's AUROC, accuracy at a 0.5 threshold."""
    all_scores, all_labels = torch.cat(scores), torch.cat(labels)
    return dict(auroc=auroc(all_scores, all_labels), auroc_interval=auroc_interval(all_scores, all_labels),
                site_auroc=[auroc(s, y) for s, y in zip(scores, labels)],
                accuracy=((all_scores > 0) == (all_labels > 0.5)).float().mean().item())


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


def one_line(error):
    """An exception as one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def not_finite(tensors):
    """Whether any floating-point value among `tensors` is NaN or infinite. A tensor's sum is finite when all of
    its values are: one fast reduction a tensor and one host sync (a maximum of the absolute values takes several
    times longer); only a tensor whose sum is not (a value that is not, or an overflow) is read value by value."""
    floats = [tensor for tensor in tensors if tensor.is_floating_point() and tensor.numel()]
    if not floats:
        return False
    sums_finite = torch.stack([tensor.sum().float() for tensor in floats]).isfinite().tolist()
    return any(not finite and not bool(tensor.isfinite().all()) for finite, tensor in zip(sums_finite, floats))


def accepted(run, state_dicts, num_examples):
    """The uploads for averaging of `run`'s round that pass the checks (`refused_uploads`), with their sites'
    numbers of examples: a refused upload is named in the log and in `run.refused`, and left out of the round's
    average. Every upload refused: ValueError, the run stops. (A process that holds none of them: all of them.)"""
    if any(leaf.is_meta for state_dict in state_dicts for leaf in leaves(state_dict)):
        return state_dicts, num_examples
    reasons = refused_uploads(state_dicts, run.cfg["max_update_ratio"])
    round = len(run.history) + 1
    for site, reason in enumerate(reasons):
        if reason:
            run.refused.append(dict(round=round, site=site, reason=reason))
            if run.cfg["log"]:
                run.cfg["log"](f"{run.scheme}: client {site}'s update refused: {reason} (round {round})")
    if all(reasons):
        raise ValueError(f"round {round}: every update refused ({'; '.join(dict.fromkeys(reasons))})")
    kept = [site for site, reason in enumerate(reasons) if not reason]
    return [state_dicts[site] for site in kept], [num_examples[site] for site in kept]


def refused_uploads(state_dicts, max_ratio):
    """Why each of a round's uploads for averaging is refused, or None where it is not: an upload with a value
    that is not finite; else, with three uploads or more, one farther from the round's coordinate-wise median
    upload than `max_ratio` times the median of those distances (a scaled, an unrelated or a sign-flipped
    model). With two uploads each is as far from their median as the other: only what is not finite shows."""
    reasons = ["not finite" if not_finite(state_dict.values()) else None for state_dict in state_dicts]
    finite = [site for site, reason in enumerate(reasons) if reason is None]
    if len(finite) < 3 or max_ratio == math.inf:
        return reasons
    squares = []  # per weight, each finite upload's squared distance from the median upload's
    for key, value in state_dicts[finite[0]].items():
        if value.is_floating_point():
            values = [state_dicts[site][key].detach().float() for site in finite]
            middle = coordinate_median(values)
            squares.append(torch.stack([torch.linalg.vector_norm(v - middle, dtype=torch.float64) for v in values]) ** 2)
    distances = torch.stack(squares).sum(0).sqrt().tolist()
    typical = statistics.median(distances)
    for site, distance in zip(finite, distances):
        if typical > 0 and distance > max_ratio * typical:
            reasons[site] = f"{distance / typical:.3g}x the median distance from the round's median update (limit {max_ratio:g})"
    return reasons


def coordinate_median(tensors):
    """The element-wise median of tensors of one shape (for an even count, the mean of the two middle values):
    for a few, an odd-even transposition network of minimums and maximums (as many passes as tensors, each
    element-wise: several times faster than a sort along the stack's first dimension), else that sort."""
    if len(tensors) > 16:
        ordered = list(torch.stack(tensors).sort(dim=0).values)
    else:
        ordered = list(tensors)
        for step in range(len(ordered)):
            for i in range(step % 2, len(ordered) - 1, 2):
                ordered[i], ordered[i + 1] = torch.minimum(ordered[i], ordered[i + 1]), torch.maximum(ordered[i], ordered[i + 1])
    return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2


def shuffled(seed, site, round, num_examples):
    """The order of a site's examples in a round (`Run.batches`): a permutation drawn from (seed, site, round)."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, site, round]).generate_state(1)[0]))
    return torch.randperm(num_examples, generator=generator)


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
    in another dtype) is measured, scored and saved where it is. Data that is elsewhere (meta) stays so."""
    weight = next(model.parameters())
    if tensor.is_meta:
        return tensor
    return tensor.to(device=weight.device, dtype=weight.dtype if tensor.is_floating_point() else tensor.dtype)


def party_kind(party):
    """"client" for a client (a site index), else the party's own name ("server", "aggregator")."""
    return "client" if isinstance(party, int) else party


def tensors(dataset):
    """(images, labels) of a site: a `data.Site`'s own tensors, a pair of them as it is, or any dataset's items
    stacked."""
    if isinstance(dataset, tuple):
        return dataset
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


# What a model part costs: bytes, FLOPs, shapes

def nbytes(obj):
    """Bytes of what travels: a tensor, several tensors, a state dict, an optimizer's state (nested)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in leaves(obj))


_flops_cache, _shape_cache = {}, {}


def training_flops(module, input_shape, input_grad=False):
    """FLOPs of one forward + backward pass per sample, for inputs of shape (C, H, W).

    Counted by `torch.utils.flop_counter.FlopCounterMode` on a weightless copy (meta device, stand-ins replaced
    by what they stand in for), once per architecture and shape. `input_grad`: the backward also computes the
    gradient of the input (a server part does, to send it back).
    """
    key = (str(module), tuple(input_shape), input_grad)
    if key not in _flops_cache:
        meta = unwrap(copy.deepcopy(module).to("meta")).eval()
        x = torch.empty(1, *input_shape, device="meta", requires_grad=input_grad)
        with FlopCounterMode(display=False) as counter:
            meta(x).sum().backward()
        _flops_cache[key] = counter.get_total_flops()
    return _flops_cache[key]


def split_flops(client_model, server_model, image_shape):
    """Training FLOPs per sample of (client part, server part) for images of shape (C, H, W); a label-private
    client part counts its head too."""
    activation_shape = output_shape(client_model, image_shape)
    client, server = (training_flops(client_model, image_shape),
                      training_flops(server_model, activation_shape, input_grad=True))
    if is_label_private(client_model):
        client += training_flops(client_model.head, output_shape(server_model, activation_shape), input_grad=True)
    return client, server


def output_shape(module, input_shape):
    """Shape of one sample's output for inputs of shape `input_shape`, on a weightless (meta) copy, once per
    architecture and shape."""
    key = (str(module), tuple(input_shape))
    if key not in _shape_cache:
        with torch.no_grad():
            meta = copy.deepcopy(module).to("meta").eval()
            _shape_cache[key] = tuple(meta(torch.empty(2, *input_shape, device="meta")).shape[1:])
    return _shape_cache[key]


# Model parts: the label-private (U-shaped) client part, a deployed model from its two sides, stand-ins

class LabelPrivateClient(nn.Sequential):
    """The client part of a label-private (U-shaped) split: the layers up to the cut, run by `forward`, and
    the classifier `head`, which the client runs on the pooled features the server sends back."""

    def forward(self, images):
        for name, layer in self.named_children():
            if name != "head":
                images = layer(images)
        return images

    @property
    def body(self):
        """The layers up to the cut, without the head, as one module (sharing them)."""
        return nn.Sequential(OrderedDict((name, layer) for name, layer in self.named_children() if name != "head"))


class LabelPrivateModel(nn.Sequential):
    """A deployed label-private model, (client part, server part): images to logits."""

    def forward(self, images):
        client_model, server_model = self
        return client_model.head(server_model(client_model(images)))


def is_label_private(client_model):
    return isinstance(client_model, LabelPrivateClient)


def joined(client_model, server_model):
    """The model a site deploys from its client part and a server part: images to logits."""
    return (LabelPrivateModel if is_label_private(client_model) else nn.Sequential)(client_model, server_model)


def whole(client_side, server_side):
    """A deployed model from its two sides, either of which may be missing (FedAvg's model is all at the site,
    central's all at the server)."""
    if client_side is None or server_side is None:
        return server_side if client_side is None else client_side
    return joined(client_side, server_side)


def meta_copy(module):
    """A copy of `module` whose weights and buffers are on the meta device (same shapes, dtypes and strides),
    made without copying any data: what a process holds of a model copy that lives at another party."""
    memo = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


class _ShapeOnly(torch.autograd.Function):
    """Forward: an output of the right shape on the meta device (no data, no arithmetic). Backward: a meta
    gradient for the input, none for the weights, so no gradient tensor is allocated and no optimizer step
    has anything to do."""

    @staticmethod
    def forward(ctx, x, output_shape, dtype, *weights):
        ctx.input_shape, ctx.input_dtype, ctx.num_weights = x.shape, x.dtype, len(weights)
        return torch.empty(len(x), *output_shape, dtype=dtype, device="meta")

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = torch.empty(ctx.input_shape, dtype=ctx.input_dtype, device="meta") if ctx.needs_input_grad[0] else None
        return (grad_input, None, None) + (None,) * ctx.num_weights


class StandIn(nn.Module):
    """A model part that computes only where its work happens, and otherwise just has the right shapes.

    Given real inputs and real weights it is the part itself. Given an input on the meta device (data that
    is elsewhere) or holding meta weights (a part that is elsewhere), it returns a meta output of the real
    output's shape and dtype, and a meta gradient for its input: the loop around it runs, and counts, as in
    training, with no arithmetic. `bench.py --costs-only` runs every scheme with meta stand-ins on meta
    data (`cost_only`); the state dicts and optimizer state of meta weights weigh what real ones weigh.
    A stand-in with meta weights stays on the meta device when the model is moved.
    """

    def __init__(self, part, input_shape):
        super().__init__()
        self.part = part
        self.output_shape = output_shape(part, input_shape)

    @property
    def is_meta(self):
        return next(self.part.parameters()).is_meta

    def _apply(self, fn, recurse=True):
        return self if self.is_meta else super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """A state dict of meta tensors is the state of a copy that lives elsewhere: a real stand-in keeps
        its own (in a distributed run, the copy of another site's part in a client's process)."""
        if not self.is_meta:
            own = self.state_dict(prefix=prefix, keep_vars=True)
            for key, value in list(state_dict.items()):
                if value.is_meta and key in own:
                    state_dict[key] = own[key].detach()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x):
        if not (x.is_meta or self.is_meta):
            return self.part(x)
        dtype = next((torch.get_autocast_dtype(kind) for kind in ("cuda", "cpu") if torch.is_autocast_enabled(kind)),
                     x.dtype)
        return _ShapeOnly.apply(x, self.output_shape, dtype, next(self.part.parameters()))


def unwrap(module):
    """`module` with every `StandIn` replaced by the part it stands in for (in place)."""
    if isinstance(module, StandIn):
        return unwrap(module.part)
    for name, child in module.named_children():
        setattr(module, name, unwrap(child))
    return module


def cost_only(client_model, server_model, image_shape):
    """(client, server) stand-ins on the meta device: they count like the real parts at no arithmetic cost.
    (A label-private client part: its layers and its head, each a stand-in.)"""
    client = StandIn(client_model.to("meta"), image_shape)
    server = StandIn(server_model.to("meta"), client.output_shape)
    if is_label_private(client_model):
        client = LabelPrivateClient(OrderedDict(layers=StandIn(client_model.body, image_shape),
                                                head=StandIn(client_model.head, server.output_shape)))
    return client, server
