"""The core every scheme file imports, and nothing else: the run (settings, seeded batches, the ledger of bytes and
FLOPs, the rounds, the loss), deploying and scoring each site's model, AUROC, what a model part costs. With torch and
numpy alone, a scheme file copied with it trains any model. A scheme makes one `Run` and is one loop over its
`rounds`; it counts where work or a transfer happens (`run.compute(party, flops)`, `run.send(source, destination,
*objects)`: a party is a client, by its site's index, "server" or "aggregator") and ends each round with
`run.deploy_and_score(...)`. A tensor on the meta device is data held elsewhere (by another process, or by nobody
in a cost-only run): the loop passes over it at no cost.
"""
import contextlib
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__version__ = "0.1.0"
LINKS = ("client->server", "server->client", "client->client", "client->aggregator", "aggregator->client")
PARTIES = ("client", "server", "aggregator")
DEFAULTS = dict(rounds=3, batch_size=32, lr=1e-3, device=None, seed=0, bf16=False, bn="local", order="fixed",
                channels_last=True, log=print, hooks=())
BN_SETTINGS = ("local", "averaged")
ORDERS = ("fixed", "shuffled")


def checked(cfg):
    """A run's settings, `DEFAULTS` where not given; a setting that is unknown or out of range: an error naming it."""
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **cfg}
    for name in ("rounds", "batch_size"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ValueError(f"{name} must be a positive whole number, not {cfg[name]!r}")
    for name, allowed in (("bn", BN_SETTINGS), ("order", ORDERS)):
        if cfg[name] not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {cfg[name]!r}")
    return cfg


class Run:
    """One scheme's run: its settings, batches, the ledger of what it costs, the rounds' history.

    The lab (the transport, checkpoints, defenses, the privacy measures, the profile) reaches a run through its
    `hooks`: objects whose methods, where a hook has one, the run calls in the order given at the moments they name.
    Those that return may change what they are given; the loops name two (`run.defended`, `run.screened`).
        stand_in(party, model) -> a stand-in for `party`'s copy where this process does not hold it, else None
        started(run, state): the loop's model copies and optimizers (`rounds`), before the first round
        round_started(run), round_ending(run), round_ended(run, entry, deployed), finished(run, result)
        defended(run, site, images, outputs) -> what client `site` sends for the outputs it computed
        sending(run, source, destination, link, objects) -> what leaves `source` (`link` None: evaluation traffic)
        sent(run, source, destination, link, objects) -> what `destination` holds of it
        screened(run, uploads, num_examples) -> the uploads the aggregator averages, and their sites' sizes
        summed(run, values) -> `values` summed over every process of the run
    """

    def __init__(self, scheme, train_sets, test_sets, **cfg):
        self.cfg = checked(cfg)
        self.scheme, self.train_sets, self.test_sets = scheme, train_sets, test_sets
        self.device = torch.device(self.cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.num_rounds, self.batch_size, self.lr = self.cfg["rounds"], self.cfg["batch_size"], self.cfg["lr"]
        self.hooks, self.image_shape = list(self.cfg["hooks"]), tuple(train_sets[0][0][0].shape)
        # the ledger: bytes and transfers (each one a party waits for) per link, FLOPs per party
        self.bytes, self.messages = dict.fromkeys(LINKS, 0), dict.fromkeys(LINKS, 0)
        self.flops = dict.fromkeys(PARTIES, 0)
        self.history, self.seconds, self.state = [], 0.0, ()
        self.holder = 0  # split learning: the site that holds the one client part (site 0 first)
        self.deployed, self.deployed_sides = None, None  # each site's deployed model, and its two sides
        self._loss_sum, self._num_losses = torch.zeros((), device=self.device), 0
        self._clock, self._deploy_copies = None, {}

    def place(self, *models):
        """Model parts on the run's device in training mode, channels-last (faster convolutions) unless told not to."""
        for model in models:
            model.to(self.device).train()
            if self.cfg["channels_last"]:
                model.to(memory_format=torch.channels_last)

    def copies(self, model, parties):
        """`model` itself for the first of `parties`, a copy of it for each other (a hook may give a party this process
        does not hold a stand-in instead)."""
        made = []
        for party in parties:
            stand_ins = [found for hook in self._hooks("stand_in") if (found := hook(party, model)) is not None]
            made.append(stand_ins[0] if stand_ins else copy.deepcopy(model) if model in made else model)
        return made

    def optimizer(self, model):
        """Adam for one model copy, kept across rounds; fused (one kernel for all its weights) where the device can."""
        return torch.optim.Adam(model.parameters(), lr=self.lr, fused=self.device.type in ("cpu", "cuda"))

    def rounds(self, *state):
        """The rounds (0-based) to train, each timed from here to its `deploy_and_score`. `state`: the model copies and
        optimizers the loop keeps across rounds, for the hooks (a checkpoint restores them, and the rounds go on)."""
        self.state = state
        for started in self._hooks("started"):
            started(self, state)
        for round in range(len(self.history), self.num_rounds):
            self._clock = time.perf_counter()
            for round_started in self._hooks("round_started"):
                round_started(self)
            yield round

    def batches(self, dataset, site, round, shuffle=True, batch_size=None):
        """A site's mini-batches for one round, on the device, shuffled by (seed, site, round)."""
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

    def note_loss(self, loss, num_examples):
        """Add a batch's mean `loss` to the round's mean training loss (summed on the device: no host sync)."""
        if not loss.is_meta:
            self._loss_sum += loss.detach() * num_examples
            self._num_losses += num_examples

    def send(self, source, destination, *objects):
        """Send `objects` (tensors, state dicts, optimizer state) from one party to another: counted on their link,
        and returned as the destination holds them (in a simulation, the same objects)."""
        link = "->".join("client" if isinstance(party, int) else party for party in (source, destination))
        return self._deliver(source, destination, link, objects)

    def send_for_evaluation(self, source, destination, *objects):
        """What deploying and scoring move between parties, outside the ledger: measurement, not the scheme's cost."""
        return self._deliver(source, destination, None, objects)

    def compute(self, party, flops):
        self.flops[party] += flops

    def defended(self, site, images, outputs):
        """What client `site` sends for the `outputs` it computed from `images`: them, or a defense's version."""
        for defended in self._hooks("defended"):
            outputs = defended(self, site, images, outputs)
        return outputs

    def screened(self, uploads, num_examples):
        """The uploads the aggregator averages, with their numbers of examples: all, or those a hook keeps."""
        for screened in self._hooks("screened"):
            uploads, num_examples = screened(self, uploads, num_examples)
        return uploads, num_examples

    def deploy_and_score(self, client_sides=None, server_sides=None):
        """End the round: its clock stops; each site deploys a model from its own side (`client_sides`: its client part,
        or FedAvg's whole model) and the server's side for it (`server_sides`: the part serving it, or central's model)
        and scores its own test images with it. bn="local": the sites deploy copies with BatchNorm statistics of their
        own training images; bn="averaged": the models as training left them."""
        for round_ending in self._hooks("round_ending"):
            round_ending(self)
        if self._clock is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds, self._clock = self.seconds + time.perf_counter() - self._clock, None
        self.deployed = self._deploy(client_sides, server_sides)
        entry = dict(round=len(self.history) + 1, loss=self._round_loss(), seconds=self.seconds, auroc=None,
                     auroc_interval=None, site_auroc=None, accuracy=None)
        if entry["loss"] is not None and not math.isfinite(entry["loss"]):
            raise FloatingPointError(f"loss is {entry['loss']} in round {entry['round']}")
        scores, labels = score(self)
        if scores is not None:  # pooled AUROC with its interval, each site's, accuracy at a 0.5 threshold
            pooled, truth = torch.cat(scores), torch.cat(labels)
            entry.update(auroc=auroc(pooled, truth), auroc_interval=auroc_interval(pooled, truth),
                         site_auroc=[auroc(s, y) for s, y in zip(scores, labels)],
                         accuracy=((pooled > 0) == (truth > 0.5)).float().mean().item())
        self.history.append(entry)
        for round_ended in self._hooks("round_ended"):
            round_ended(self, entry, self.deployed)
        if self.cfg["log"]:  # one line a round: "sfv1 round 2/5 loss 0.5223 auroc 0.830 elapsed 7.5s"
            shown = lambda value, digits: "-" if value is None else f"{value:.{digits}f}"
            self.cfg["log"](f"{self.scheme} round {entry['round']}/{self.num_rounds} loss {shown(entry['loss'], 4)} "
                            f"auroc {shown(entry['auroc'], 3)} elapsed {entry['seconds']:.1f}s")

    def result(self, client_sides=None, server_sides=None):
        """The run's numbers and each site's model, as the last round deployed it (deployed here from these sides only
        where no round ran: a run restored whole)."""
        if self.deployed is None:
            self.deployed = self._deploy(client_sides, server_sides)
        last = self.history[-1] if self.history else {}
        result = dict(scheme=self.scheme, bn=self.cfg["bn"],
                      **{key: last.get(key) for key in ("auroc", "auroc_interval", "site_auroc", "accuracy", "loss")},
                      bytes=dict(self.bytes), messages=dict(self.messages), flops=dict(self.flops),
                      seconds=self.seconds, history=self.history, models=self.deployed,
                      num_examples=[len(s) for s in self.train_sets])
        for finished in self._hooks("finished"):
            finished(self, result)
        return result

    def _hooks(self, name):
        return [getattr(hook, name) for hook in self.hooks if hasattr(hook, name)]

    def _deliver(self, source, destination, link, objects):
        for sending in self._hooks("sending"):
            objects = sending(self, source, destination, link, objects)
        if link is not None:
            self.bytes[link] += nbytes(objects)
            self.messages[link] += 1
        for sent in self._hooks("sent"):
            objects = sent(self, source, destination, link, objects)
        return objects[0] if len(objects) == 1 else objects

    def _deploy(self, client_sides, server_sides):
        """Each site's deployed model (`deploy_and_score`), from copies of its sides under bn="local"."""
        num_sites, local = len(self.test_sets), self.cfg["bn"] == "local"
        sides = list(zip(client_sides or [None] * num_sites, server_sides or [None] * num_sites))
        shared = num_sites > 1 and sides[0][0] is not None and all(side is sides[0][0] for side, _ in sides)
        if local:  # copies, so that training goes on with its own models untouched
            sides = [tuple(refreshed(self._deploy_copies, (site, side), model) for side, model in enumerate(pair))
                     for site, pair in enumerate(sides)]
        for site, (client_side, server_side) in enumerate(sides):
            if shared and site != self.holder:  # split learning: the holder's client part, copied to every site
                self.send_for_evaluation(self.holder, site, client_side.state_dict())
            if local:
                local_statistics(self, site, client_side, server_side)
        self.deployed_sides = sides
        return [whole(client_side, server_side) for client_side, server_side in sides]

    def _round_loss(self):
        """The round's mean training loss, over every process of the run; None where no loss was computed."""
        total, count = self._loss_sum, self._num_losses
        for summed in self._hooks("summed"):
            total, count = summed(self, [total, count])
        self._loss_sum, self._num_losses = torch.zeros((), device=self.device), 0
        return float(total / count) if count else None


@torch.no_grad()
def local_statistics(run, site, client_side, server_side):
    """A site's deployed sides get BatchNorm statistics of its training images (the server side's from what the site
    sends it), in batches of at least 128: the larger the batch, the nearer to the deployed model's normalisation."""
    with batchnorm_statistics(*[side for side in (client_side, server_side) if side is not None]):
        for images, _ in run.batches(run.train_sets[site], site, 0, shuffle=False, batch_size=max(run.batch_size, 128)):
            with run.autocast():
                outputs = forward(client_side, images)
                if server_side is not None:  # (a whole model at the site, FedAvg's: nothing leaves it)
                    forward(server_side, run.send_for_evaluation(site, "server", outputs))


@torch.no_grad()
def score(run):
    """Each site's deployed model scores that site's test images: (scores, labels), one tensor of each per site, in
    the process that holds them ((None, None) elsewhere)."""
    scores, labels = [], []
    for site, sides in enumerate(run.deployed_sides):
        training = [(side, side.training) for side in sides if side is not None]
        for side, _ in training:
            side.eval()
        site_scores, site_labels = [], []
        batches = run.batches(run.test_sets[site], 0, 0, shuffle=False, batch_size=max(run.batch_size, 128))
        for images, targets in batches:
            with run.autocast():
                outputs, targets = run.send_for_evaluation(site, "server", forward(sides[0], images), targets)
                logits = forward(sides[1], outputs)
                if hasattr(sides[0], "head"):  # a client part with a head (a U-shaped split): the site runs it
                    head_outputs = sides[0].head(run.send_for_evaluation("server", site, logits))
                    logits = run.send_for_evaluation(site, "server", head_outputs)
            site_scores.append(logits.float().squeeze(1))
            site_labels.append(targets)
        for side, mode in training:
            side.train(mode)
        scores.append(torch.cat(site_scores))
        labels.append(torch.cat(site_labels))
    if any(site_scores.is_meta for site_scores in scores):
        return None, None
    return [site_scores.cpu() for site_scores in scores], [site_labels.cpu() for site_labels in labels]


def refreshed(copies, key, model):
    """`copies[key]`, a copy of `model` to deploy, made once and then given `model`'s state (faster than a new copy)."""
    if model is not None and key in copies:
        copies[key].load_state_dict(model.state_dict())
    elif model is not None:
        copies[key] = copy.deepcopy(model)
    return None if model is None else copies[key]


@contextlib.contextmanager
def batchnorm_statistics(*models):
    """Recompute BatchNorm running statistics from the forward passes inside the block: `models` in train mode, each
    BatchNorm layer notes each batch's mean and variance (its own, at momentum 1); on leaving, its running statistics
    become their exact pooled mean and unbiased variance, in float64 (within batches plus between their means, each
    batch weighted by its size), as one pass with momentum=None over every image at once. Left in eval mode."""
    layers = [m for model in models for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seen, momenta = {layer: [] for layer in layers}, [layer.momentum for layer in layers]

    def note(layer, inputs, output):  # per batch: values per channel, variance (the running one is unbiased), mean
        count = inputs[0].numel() // inputs[0].shape[1]
        seen[layer].append((count, layer.running_var * ((count - 1) / count), layer.running_mean.clone()))

    hooks = [layer.register_forward_hook(note) for layer in layers]
    for layer in layers:
        layer.momentum = 1.0
    for model in models:
        model.train()
    try:
        yield
    finally:
        for hook, layer, momentum in zip(hooks, layers, momenta):
            hook.remove()
            layer.momentum = momentum
    with torch.no_grad():
        for layer, batches in seen.items():
            if not batches:
                continue
            counts = torch.tensor([n for n, _, _ in batches], dtype=torch.float64, device=layer.running_mean.device)
            variances, means = (torch.stack([batch[i] for batch in batches]).double() for i in (1, 2))
            mean = counts @ means / counts.sum()
            layer.running_mean.copy_(mean)
            layer.running_var.copy_((counts @ variances + counts @ (means - mean) ** 2) / max(counts.sum() - 1, 1))
    for model in models:
        model.eval()


def whole(client_side, server_side):
    """A site's deployed model, images to logits, from its two sides (either may be missing: FedAvg's, central's); a
    client side with a `head` (a U-shaped split, whose labels stay at the client) runs it last."""
    sides = [side for side in (client_side, server_side) if side is not None]
    if hasattr(client_side, "head"):
        sides.append(client_side.head)
    return sides[0] if len(sides) == 1 else nn.Sequential(*sides)


def forward(side, inputs):
    """One side of a deployed model on `inputs` (on the side's device and dtype); no side: the inputs travel on."""
    return inputs if side is None else side(to_model(inputs, side))


def to_model(tensor, model):
    """`tensor` where `model` computes (its device, and its dtype if floating point): a model trained on a GPU, or kept
    in another dtype, is measured, scored and saved where it is. Meta data stays meta."""
    weight = next(model.parameters())
    if tensor.is_meta:
        return tensor
    return tensor.to(weight.device, weight.dtype if tensor.is_floating_point() else tensor.dtype)


def bce(logits, labels):
    """The loss every scheme trains on: binary cross-entropy on one logit per image, in float32, mean over the batch.
    Logits held elsewhere (meta) have no loss here, only a gradient of their shape for the loop to pass on."""
    if logits.is_meta:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits.squeeze(1).float(), labels)


def seeded(*key, stream=None):
    """A torch generator seeded from the numbers in `key` by numpy's SeedSequence (near keys give unrelated streams);
    `stream` keeps apart what one key seeds for different purposes."""
    sequence = np.random.SeedSequence([int(part) for part in key], spawn_key=() if stream is None else (stream,))
    return torch.Generator().manual_seed(int(sequence.generate_state(1)[0]))


def shuffled(seed, site, round, num_examples):
    """The order of a site's examples in a round: a permutation drawn from (seed, site, round)."""
    return torch.randperm(num_examples, generator=seeded(seed, site, round))


def batch_bounds(num_examples, batch_size):
    """(start, end) of each mini-batch; a lone last example joins the one before (BatchNorm cannot train on one)."""
    ends = list(range(batch_size, num_examples, batch_size)) + [num_examples]
    if len(ends) > 1 and ends[-1] - ends[-2] == 1:
        del ends[-2]
    return list(zip([0] + ends[:-1], ends))


def tensors(dataset):
    """(images, labels) of a site: a `data.Site`'s tensors, a pair of them as it is, or any dataset's items stacked."""
    if isinstance(dataset, tuple):
        return dataset
    if hasattr(dataset, "images"):
        return dataset.images, dataset.labels
    return torch.stack([item[0] for item in dataset]), torch.tensor([float(item[1]) for item in dataset])


def auroc(scores, labels):
    """Area under the ROC curve: the chance that a positive outscores a negative, ties counting one half (Mann-Whitney
    U with average ranks). None when the labels hold one class only (not defined)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0.5
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    if num_pos == 0 or num_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank of each distinct score, ties averaged
    rank_sum = average_rank[inverse][positive].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def auroc_interval(scores, labels, level=0.95, num_resamples=2000, seed=0):
    """A (low, high) percentile interval for `auroc`, by a seeded bootstrap resampling positives and negatives apart;
    None for one class. AUROC is the mean of `wins` over (positive, negative) pairs, so a resample drawing each positive
    a times and each negative b times has AUROC a @ wins @ b over the number of pairs: no sorting."""
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


def nbytes(objects):
    """Bytes of what travels: a tensor, or tensors in tuples, lists and dicts (a state dict, an optimizer's state)."""
    if isinstance(objects, torch.Tensor):
        return objects.numel() * objects.element_size()
    values = objects.values() if isinstance(objects, dict) else objects if isinstance(objects, (list, tuple)) else ()
    return sum(nbytes(value) for value in values)


_counted = {}  # what `training_flops` and `output_shape` found, by architecture and shape: counting takes seconds


def training_flops(module, input_shape, input_grad=False):
    """FLOPs of one forward and backward pass per sample of shape (C, H, W), by torch's `FlopCounterMode` on a meta
    copy. `input_grad`: the backward also computes the input's gradient (a server part's, to send it back)."""
    key = ("flops", str(module), tuple(input_shape), input_grad)
    if key not in _counted:
        meta = copy.deepcopy(module).to("meta").eval()
        x = torch.empty(1, *input_shape, device="meta", requires_grad=input_grad)
        with FlopCounterMode(display=False) as counter:
            meta(x).sum().backward()
        _counted[key] = counter.get_total_flops()
    return _counted[key]


def output_shape(module, input_shape):
    """Shape of one sample's output for inputs of shape `input_shape`, from a weightless (meta) copy."""
    key = ("shape", str(module), tuple(input_shape))
    if key not in _counted:
        with torch.no_grad():
            meta = copy.deepcopy(module).to("meta").eval()
            _counted[key] = tuple(meta(torch.empty(2, *input_shape, device="meta")).shape[1:])
    return _counted[key]
