"""What a client can do so that the server or the aggregator learns less, and the guarantee it gets.

Each defense runs in the client's own process, as a hook of its run (`Defense`): NoPeek's distance correlation
penalty and Gaussian noise on the activations it sends, Gaussian noise on the gradients a label-private client returns,
and client-level differential privacy on what it uploads for averaging, with its ε (`epsilon`). Strength 0 is no
defense at all: bit for bit the undefended run.
"""
import copy
import math

import torch
from torch import nn

from attacks import u_centre
from common import seeded


def nopeek_penalty(images, activations):
    """NoPeek's penalty on one mini-batch: the bias-corrected dCor² of `distance_correlation` between the
    images and the activations, differentiable, floored at 0 (below it the two are as independent as the
    estimate can tell), in float64 where the activations are. NoPeek itself used the plain sample distance
    correlation; at these dimensions that estimate is near 1 even for independent data (docs/privacy.md)."""
    a, b = (u_centre(samples.flatten(1).double() @ samples.flatten(1).double().T).to(activations.device)
            for samples in (images, activations))
    return ((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt().clamp(min=1e-30)).clamp(min=0)


NOPEEK_ELEMENTWISE = 40  # FLOPs per entry of the n x n matrices, forward and backward (docs/privacy.md, "Defenses")
NOISE_FLOPS = 6  # per noised number: its share of the batch's standard deviation (4), the scaled add (2)


def nopeek_flops(num_examples, image_numel, activation_numel):
    """Client FLOPs of one NoPeek step on a batch of n: the Gram matrices of the images (2 n² p) and of the
    activations (2 n² q), the backward of the activations' (4 n² q; the images need no gradient), and the
    elementwise work on the n x n matrices (distances, centring, inner products and their gradients)."""
    n = num_examples
    return 2 * n * n * image_numel + 6 * n * n * activation_numel + NOPEEK_ELEMENTWISE * n * n


class _NoPeek(torch.autograd.Function):
    """Forward: the activations, unchanged. Backward: their gradient from the server plus alpha times the
    gradient of `nopeek_penalty`, so the client's own backward pass trains on loss + alpha * dCor²."""

    @staticmethod
    def forward(ctx, activations, images, alpha):
        ctx.save_for_backward(activations, images)
        ctx.alpha = alpha
        return activations.view_as(activations)

    @staticmethod
    def backward(ctx, grad_activations):
        activations, images = ctx.saved_tensors
        with torch.enable_grad():
            activations = activations.detach().to(torch.promote_types(activations.dtype, torch.float32))
            activations.requires_grad_()
            (grad_penalty,) = torch.autograd.grad(ctx.alpha * nopeek_penalty(images, activations), activations)
        return grad_activations + grad_penalty.to(grad_activations.dtype), None, None


class Defense:
    """What a client does so that the server or the aggregator learns less, as a hook of its run; each runs in the
    client's own process, and strength 0 is no defense at all (bit for bit the undefended run).

    nopeek (alpha): the client trains on loss + alpha * `nopeek_penalty(images, activations)` per mini-batch
        (Vepakomma et al. 2020); the server's step is unchanged.
    noise (sigma): the client adds Gaussian noise of standard deviation sigma times the batch's own standard
        deviation to the activations it sends, and trains on what it sent. No ε: nothing bounds what one image
        contributes.
    gradient_noise (sigma): a label-private client does the same to the gradient of the pooled features it returns
        (against the label attacks of `attacks.label_leak`).
    dp (sigma), with `clip` and `delta`: client-level differential privacy for what a client uploads for averaging
        (McMahan et al. 2018, at the client): its update since the round began (every floating-point number of its
        state dict, weights and BatchNorm statistics) clipped to L2 norm `clip`, plus Gaussian noise of standard
        deviation sigma x clip (`update`); ε at `delta` from `epsilon`. clip None: unbounded.
    The noise is drawn on the CPU from a generator seeded by the key (seed, site, round, batch), so one run gives the
    same noise on any device and in any process. Each defense's client FLOPs are counted where it runs.
    """

    NAMES = ("nopeek", "noise", "gradient-noise", "dp")

    def __init__(self, nopeek=0.0, noise=0.0, gradient_noise=0.0, dp=0.0, clip=None, delta=1e-5):
        self.nopeek, self.noise, self.gradient_noise, self.dp = float(nopeek), float(noise), float(gradient_noise), float(dp)
        self.clip, self.delta = (None if clip is None or math.isinf(clip) else float(clip)), float(delta)
        if self.dp and self.clip is None:
            raise ValueError("dp noise is sigma x clip: it needs a finite clip")
        self.state, self.batches, self.starts = (), {}, {}

    def __str__(self):
        strengths = zip(self.NAMES, (self.nopeek, self.noise, self.gradient_noise, self.dp))
        named = [f"{name}:{strength:g}" for name, strength in strengths if strength]
        return "+".join(named + ([f"clip:{self.clip:g}"] if self.clip is not None else [])) or "none"

    def __bool__(self):
        return bool(self.nopeek or self.noise or self.gradient_noise or self.protects_uploads)

    @property
    def protects_uploads(self):
        """Whether what a client uploads for averaging is changed (clipped, noised)."""
        return self.clip is not None

    # The run's hooks

    def started(self, run, state):
        self.state = state

    def round_started(self, run):
        """Each site's batches are counted afresh (they seed the noise); where uploads are clipped, the weights each
        model copy starts the round from are kept, by the memory they live in (what an upload is made of)."""
        self.batches = {}
        if self.protects_uploads:
            self.starts = {first_tensor(part.state_dict()).data_ptr(): copy.deepcopy(part.state_dict())
                           for part in self.state if isinstance(part, nn.Module) and not first_tensor(part.state_dict()).is_meta}

    def defended(self, run, site, images, outputs):
        batch = self.batches[site] = self.batches.get(site, -1) + 1
        outputs, flops = self.activations(images, outputs, (run.cfg["seed"], site, len(run.history), batch))
        run.compute("client", flops)
        return outputs

    def sending(self, run, source, destination, link, objects):
        """A label-private client's returned gradient (the 2-D tensor it sends the server) noised; an upload for
        averaging clipped and noised (dp)."""
        key = run.cfg["seed"], source, len(run.history)
        if link == "client->server" and objects[0].dim() == 2 and self.gradient_noise:
            gradient, flops = self.gradient(objects[0], (*key, self.batches[source]))
            run.compute("client", flops)
            return (gradient, *objects[1:])
        if link == "client->aggregator" and self.protects_uploads:
            state = objects[0]
            uploaded, flops = self.update(state, self.starts.get(first_tensor(state).data_ptr()), (*key, 0))
            run.compute("client", flops)
            return (uploaded, *objects[1:])
        return objects

    # What each defense makes of what the client sends

    def activations(self, images, activations, key):
        """What the client sends for a batch it computed `activations` for, and the FLOPs this cost it."""
        flops = 0
        if self.nopeek and len(images) >= 4:  # (U-centring needs 4 samples)
            flops += nopeek_flops(len(images), images[0].numel(), activations[0].numel())
            if not activations.is_meta:
                activations = _NoPeek.apply(activations, images, self.nopeek)
        if self.noise:
            flops += NOISE_FLOPS * activations.numel()
            activations = self.noisy(activations, self.noise, key, stream=2)
        return activations, flops

    def gradient(self, gradient, key):
        """The gradient a label-private client returns, and the FLOPs this cost it."""
        if not self.gradient_noise:
            return gradient, 0
        return self.noisy(gradient, self.gradient_noise, key, stream=3), NOISE_FLOPS * gradient.numel()

    def update(self, state, start, key):
        """What a client uploads for averaging, from its `state` (a state dict) and `start` (the same at the round's
        start), and the FLOPs this cost it: start + its update clipped to norm `clip`, plus noise of standard deviation
        dp x clip on every number. Integer buffers (counts of batches) go as they are. Without dp: `state`, at no cost."""
        if not self.protects_uploads:
            return state, 0
        keys = [name for name, value in state.items() if value.is_floating_point()]
        flops = DP_FLOPS * sum(state[name].numel() for name in keys)
        if state[keys[0]].is_meta:  # a copy another process holds: the shapes travel, and the same cost is counted
            return state, flops
        updates = [state[name].double() - start[name].double() for name in keys]
        norm = float(torch.sqrt(sum(update.square().sum() for update in updates)))
        scale = min(1.0, self.clip / norm) if self.clip is not None and norm > 0 else 1.0
        generator = seeded(*key, stream=5)
        uploaded = dict(state)
        for name, update in zip(keys, updates):
            noise = torch.randn(update.shape, generator=generator, dtype=torch.float64).to(update.device) * self.dp * (self.clip or 0)
            uploaded[name] = (start[name].double() + update * scale + noise).to(state[name].dtype)
        return uploaded, flops

    @staticmethod
    def noisy(tensor, sigma, key, stream):
        """`tensor` plus Gaussian noise of standard deviation sigma x its own, seeded by `key` (`stream` keeps the
        activations', the gradients' and the measurements' noise apart); in `tensor`'s dtype."""
        if tensor.is_meta:
            return tensor
        noise = torch.randn(tensor.shape, generator=seeded(*key, stream=stream))
        scale = sigma * tensor.detach().float().std()
        return (tensor.float() + scale * noise.to(tensor.device)).to(tensor.dtype)


def first_tensor(state_dict):
    return next(iter(state_dict.values()))


DP_FLOPS = 6  # per uploaded number: the update (1), its share of the norm (2), the clip (1), the noise (1), the start (1)
RDP_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))  # Rényi orders, as Opacus's RDP accountant


def epsilon(sigma, rounds, delta, orders=RDP_ORDERS):
    """ε at `delta` of a client's uploads over `rounds` rounds, each the Gaussian mechanism with noise multiplier
    `sigma` on an update clipped to the noise's scale, every round (sample rate 1), under add/remove adjacency
    of the site's data: Rényi DP alpha / (2 sigma²) per round at each order alpha (Mironov 2017), composed by
    adding, then converted to (ε, δ) as Opacus converts it (Balle et al. 2020), the best order kept. None (no
    guarantee) without noise."""
    if not sigma:
        return None
    return min(rounds * alpha / (2 * sigma ** 2) + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
               for alpha in orders)
