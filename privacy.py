"""What the server can learn: how much of the X-ray the activations at the cut still carry, and the labels.

- `distance_correlation`: statistical dependence between the images and the activations a site sends
  (bias-corrected, so 0 means independent and 1 a distance-preserving map), and the same with the pairs
  shuffled beside it: the value that means nothing.
- `reconstruction_attack`: the server trains a decoder on another site's images and their activations
  (He, Zhang and Lee, ACSAC 2019: a black-box inverse network) and inverts the victim site's activations;
  SSIM and PSNR, next to the floor of predicting the attacker's mean image for every victim image.
- `label_leak`: in a label-private (U-shaped) split the labels stay home, but the gradients the client
  returns for the pooled features still carry them (Li et al., ICLR 2022): the norm and cosine attacks.
- `cuts_sweep`: all of it at every cut of one trained model.

And what a client can do about it (`Defense`, run inside the client's own process): NoPeek's distance
correlation penalty, Gaussian noise on the activations it sends, and Gaussian noise on the gradients a
label-private client returns. Every measure above takes the defense, so that it measures what the server
actually receives.
"""
import copy
import math
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import Observer, auroc, batch_bounds, is_label_private, shuffled, to_model, unwrap
from densenet_split import CUTS, merge, split_model


def distance_correlation(x, z, chunk_size=1 << 16):
    """Bias-corrected squared distance correlation between n samples of x and of z (each sample flattened).

        a_ij = |x_i - x_j|,  A_ij = a_ij - a_i. / (n-2) - a_.j / (n-2) + a_.. / ((n-1)(n-2))  for i != j, A_ii = 0
        (A . B) = sum_{i != j} A_ij B_ij / (n (n-3))
        dCor²   = (A . B) / sqrt((A . A)(B . B))

    with a_i. the row sums of a and a_.. its total (U-centring; Székely and Rizzo 2014, R energy's bcdcor).
    About 0 for independent samples whatever their dimension (the plain dCor² is biased towards 1 there),
    1 when z is a distance-preserving map of x. The pairwise distances come from Gram matrices summed in
    float64 over chunks of `chunk_size` features, so that even 224 px activations at conv0 fit in memory.
    """
    if len(x) != len(z):
        raise ValueError(f"distance correlation needs the same number of samples, not {len(x)} and {len(z)}")
    return _dcor(u_centred_distances(x, chunk_size), u_centred_distances(z, chunk_size))


def u_centred_distances(samples, chunk_size=1 << 16):
    """The U-centred matrix A of pairwise distances between n samples (float64, on the CPU): see
    `distance_correlation`. Shuffling the samples shuffles its rows and columns alike."""
    n = len(samples)
    if n < 4:
        raise ValueError(f"distance correlation needs at least 4 samples, not {n}")
    samples = samples.reshape(n, -1)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, samples.shape[1], chunk_size):
        part = samples[:, start:start + chunk_size].double().cpu()
        gram += part @ part.T
    return u_centre(gram)


def u_centre(gram):
    """The U-centred distance matrix from the Gram matrix of n samples; differentiable (the zero distance of
    a sample to itself never reaches the square root, whose gradient there is infinite)."""
    n = len(gram)
    squared = gram.diagonal()
    apart = ~torch.eye(n, dtype=torch.bool, device=gram.device)
    squared_distances = torch.where(apart, squared[:, None] + squared[None, :] - 2 * gram, 1)
    a = torch.where(apart, squared_distances.clamp(min=1e-30).sqrt(), 0)
    rows = a.sum(1)
    centred = a - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + rows.sum() / ((n - 1) * (n - 2))
    return torch.where(apart, centred, 0)


def _dcor(a, b):
    """dCor² from two U-centred distance matrices."""
    ab, aa, bb = (a * b).sum(), (a * a).sum(), (b * b).sum()
    if aa <= 0 or bb <= 0:
        return 0.0
    return float(ab / (aa * bb).sqrt())


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
    """What a client does so that the server or the aggregator learns less; each runs in the client's own
    process, and strength 0 is no defense at all (bit for bit the undefended run).

    nopeek (alpha): the client trains on loss + alpha * `nopeek_penalty(images, activations)` per mini-batch
        (Vepakomma et al. 2020); the server's step is unchanged.
    noise (sigma): the client adds Gaussian noise of standard deviation sigma times the batch's own standard
        deviation to the activations it sends, and trains on what it sent. No ε: nothing bounds what one
        image contributes.
    gradient_noise (sigma): a label-private client does the same to the gradient of the pooled features it
        returns (against the label attacks of `label_leak`).
    dp (sigma), with `clip` and `delta`: client-level differential privacy for what a client uploads for
        averaging (McMahan et al. 2018, at the client): its update since the round began (every floating-point
        number of its state dict, weights and BatchNorm statistics) clipped to L2 norm `clip`, plus Gaussian
        noise of standard deviation sigma x clip (`update`); ε at `delta` from `epsilon`. clip None: unbounded.
    The noise is drawn on the CPU from a generator seeded by the key (seed, site, round, batch), so one run
    gives the same noise on any device and in any process.
    """

    NAMES = ("nopeek", "noise", "gradient-noise", "dp")

    def __init__(self, nopeek=0.0, noise=0.0, gradient_noise=0.0, dp=0.0, clip=None, delta=1e-5):
        self.nopeek, self.noise, self.gradient_noise, self.dp = float(nopeek), float(noise), float(gradient_noise), float(dp)
        self.clip, self.delta = (None if clip is None or math.isinf(clip) else float(clip)), float(delta)
        if self.dp and self.clip is None:
            raise ValueError("dp noise is sigma x clip: it needs a finite clip")

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
        """What a client uploads for averaging, from its `state` (a state dict) and `start` (the same at the
        round's start), and the FLOPs this cost it: start + its update clipped to norm `clip`, plus noise of
        standard deviation dp x clip on every number. Integer buffers (counts of batches) go as they are.
        Without this defense: `state` itself, at no cost."""
        if not self.protects_uploads:
            return state, 0
        keys = [key_ for key_, value in state.items() if value.is_floating_point()]
        flops = DP_FLOPS * sum(state[name].numel() for name in keys)
        if state[keys[0]].is_meta:  # a copy another process holds: the shapes travel, and the same cost is counted
            return state, flops
        updates = [state[name].double() - start[name].double() for name in keys]
        norm = float(torch.sqrt(sum(update.square().sum() for update in updates)))
        scale = min(1.0, self.clip / norm) if self.clip is not None and norm > 0 else 1.0
        seed = np.random.SeedSequence([int(part) for part in key], spawn_key=(5,)).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        uploaded = dict(state)
        for name, update in zip(keys, updates):
            noise = torch.randn(update.shape, generator=generator, dtype=torch.float64).to(update.device) * self.dp * (self.clip or 0)
            uploaded[name] = (start[name].double() + update * scale + noise).to(state[name].dtype)
        return uploaded, flops

    @staticmethod
    def noisy(tensor, sigma, key, stream):
        """`tensor` plus Gaussian noise of standard deviation sigma x its own, seeded by `key` (`stream` keeps
        the activations', the gradients' and the measurements' noise apart); in `tensor`'s dtype."""
        if tensor.is_meta:
            return tensor
        seed = np.random.SeedSequence([int(part) for part in key], spawn_key=(stream,)).generate_state(1)[0]
        noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(int(seed)))
        scale = sigma * tensor.detach().float().std()
        return (tensor.float() + scale * noise.to(tensor.device)).to(tensor.dtype)


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


@torch.no_grad()
def sent_activations(client_model, images, batch_size, defense=None, bf16=False, key=()):
    """The activations a client sends for `images`, as in training (train mode, in its batch size, in bf16
    under `bf16`, with `defense`'s noise seeded by `key` and the batch), from a copy so that the model's
    BatchNorm statistics are untouched; in float32, where the model is."""
    client_model = copy.deepcopy(client_model).train()
    device = next(client_model.parameters()).device
    sent = []
    for batch, (start, end) in enumerate(batch_bounds(len(images), batch_size)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            activations = client_model(to_model(images[start:end], client_model))
        if defense and defense.noise:
            activations = defense.noisy(activations, defense.noise, (*key, batch), stream=4)
        sent.append(activations.float())
    return torch.cat(sent)


def leakage(client_model, images, batch_size, seed=0, defense=None, bf16=False):
    """`dependence` of a site's images and the activations `client_model` sends for them (`sent_activations`)."""
    return dependence(images, sent_activations(client_model, images, batch_size, defense, bf16, key=(seed,)), seed)


def dependence(images, activations, seed=0):
    """dCor² between images and the activations sent for them (pairs in order), and with the pairs shuffled
    (seeded): the value that means nothing."""
    a, b = u_centred_distances(images), u_centred_distances(activations)
    shuffled = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return dict(dcor=_dcor(a, b), dcor_shuffled=_dcor(a, b[shuffled][:, shuffled]))


def ssim(a, b, window=11, sigma=1.5):
    """Mean structural similarity (Wang et al. 2004: Gaussian window, K1 = 0.01, K2 = 0.03) per image pair
    of (N, 1, H, W) images in [0, 1]."""
    taps = torch.exp(-0.5 * ((torch.arange(window) - window // 2) / sigma) ** 2)
    kernel = (taps[:, None] * taps[None, :] / taps.sum() ** 2).to(a)[None, None]
    blur = lambda image: F.conv2d(image, kernel)  # valid positions only, as the reference implementation
    mean_a, mean_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mean_a ** 2, blur(b * b) - mean_b ** 2
    covariance = blur(a * b) - mean_a * mean_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    index = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / ((mean_a ** 2 + mean_b ** 2 + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(1)


def psnr(a, b):
    """Peak signal-to-noise ratio in dB per image pair, for images in [0, 1]."""
    return 10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1).clamp(min=1e-10))


class Decoder(nn.Module):
    """The attacker's inverse network: activations (C x h x w) to a 1 x size x size image.

    It starts at the floor: its last convolution is zero and a learned template, the attacker's mean image,
    is added before the sigmoid, so that what it learns is the margin above offering the mean image. (Without
    the template, a cut whose activations are 1 x 1 could only be upsampled into flat images: SSIM 0.155
    against a floor of 0.704 at 48 px, measured.)"""

    def __init__(self, channels, size, mean_image, width=64):
        super().__init__()
        self.size = size
        self.layers = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.out = nn.Sequential(nn.Conv2d(width, width // 2, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width // 2, 1, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.template = nn.Parameter(torch.logit(mean_image.reshape(1, 1, size, size), eps=1e-3))

    def forward(self, activations):
        features = upsample(self.layers(activations), self.size)
        return torch.sigmoid(self.out(features) + self.template)


def upsample(images, size):
    """Bilinear resizing of (..., h, w) to (..., size, size), as `F.interpolate(mode="bilinear",
    align_corners=False)` computes it, written as two products with the 1-D interpolation matrices: its
    backward pass is deterministic on a GPU, where interpolate's is not (`--deterministic` would refuse it)."""
    def weights(length):  # (size, length): row y holds the weights of the inputs that output y mixes
        identity = torch.eye(length, dtype=images.dtype, device=images.device)[None]
        return F.interpolate(identity, size=size, mode="linear", align_corners=False)[0].T
    return weights(images.shape[-2]) @ images @ weights(images.shape[-1]).T


def reconstruction_attack(client_model, attacker_images, victim_images, batch_size, steps=1000, target_size=None,
                          seed=0, attacker_model=None, defense=None, bf16=False):
    """The server inverts a victim site's activations with a decoder trained on another site's images.

    The attacker sees (activations, image) pairs for its own images (`attacker_images`, passed through
    `attacker_model`, by default the victim's own client part: black-box query access), trains `Decoder`
    with Adam for `steps` steps to predict the image, and decodes the victim's activations, as the victim
    sends them (with `defense`'s noise; in bf16 under `bf16`). Images are compared at `target_size` (default:
    their own size; larger than 64 px, a 64 x 64 target). Returns SSIM and PSNR of the reconstructions and
    of the floor: the attacker's mean image offered as every victim image.
    """
    known, victim = (sent_activations(model, images, batch_size, defense, bf16, key=(seed, index))
                     for index, (model, images) in enumerate(((attacker_model or client_model, attacker_images),
                                                              (client_model, victim_images))))
    return decode(known, attacker_images, victim, victim_images, steps, target_size, seed)


def decode(known, attacker_images, victim, victim_images, steps=1000, target_size=None, seed=0):
    """He, Zhang and Lee's black-box attack on activations as the attacker received them: `Decoder` trained with
    Adam for `steps` steps on the pairs it knows (`known` activations of `attacker_images`), then applied to the
    victim's activations (`victim`) and compared with `victim_images` at `target_size` (default: their own
    size; larger than 64 px, 64 x 64). Returns SSIM and PSNR of the reconstructions, and of the floor: the
    attacker's mean image offered as every victim image."""
    size = target_size or min(attacker_images.shape[-1], 64)
    known, victim = known.float(), victim.float()
    shrink = lambda images: F.interpolate(images.float(), size=(size, size), mode="area").to(known.device)
    known_images, victim_images = shrink(attacker_images), shrink(victim_images)
    mean_image = known_images.mean(0, keepdim=True)
    generator = torch.Generator().manual_seed(seed)  # the decoder's start and its batches: the same on every device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = Decoder(known.shape[1], size, mean_image.cpu()).to(known.device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    for _ in range(steps):
        batch = torch.randint(len(known), (min(32, len(known)),), generator=generator)
        loss = F.mse_loss(decoder(known[batch]), known_images[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        reconstructed = decoder.eval()(victim)
    return dict(compared(reconstructed, victim_images, known_images, size), steps=steps)


def invert_gradient(model, gradients, labels, image_shape, steps=2000, seed=0, restarts=1, lr=0.1, tv=1e-4, start=None):
    """Images in [0, 1], shape (N, *image_shape), whose gradient of the package's loss (BCE with logits on one
    logit, mean over the batch) with respect to `model.parameters()`, in that order, matches `gradients`: what
    a party that holds the model and receives a gradient (or an update) can reconstruct of the images behind it.

    Geiping et al. 2020 ("Inverting Gradients"): the distance is 1 - the cosine similarity of the two gradients,
    all parameters at once (blind to the update's scale, which a learning rate or Adam's normalisation sets);
    Adam (`lr`) on images parameterised by a sigmoid, so that they stay in [0, 1], its rate divided by ten at
    3/8, 5/8 and 7/8 of `steps`; a total-variation prior of weight `tv`; `restarts` random starts (seeded by
    `seed`; `start`: images to begin from instead, such as the attacker's prior, each a little apart), of which the
    one whose gradient
    matches best is kept. `labels` (N floats) are known to the
    attacker (`label_leak` and the label counts say how far that holds). The model runs as it is (a client's
    in train mode normalises by the batch, as its training did), on a copy: its weights and statistics are
    untouched."""
    model = copy.deepcopy(model)
    weights = list(model.parameters())
    target = [to_model(gradient, model) for gradient in gradients]
    target_norm = torch.sqrt(sum(gradient.double().square().sum() for gradient in target))
    labels = torch.as_tensor(labels, dtype=torch.float32).to(next(model.parameters()).device)
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(restarts):
        noise = torch.randn(len(labels), *image_shape, generator=generator)
        # (from `start`, a little noise apart: identical images in a batch give BatchNorm no variance to divide by)
        logits = noise if start is None else torch.logit(start.float().cpu(), eps=1e-3) + 0.1 * noise
        logits = logits.to(labels.device).requires_grad_()
        optimizer = torch.optim.Adam([logits], lr=lr)
        decay = torch.optim.lr_scheduler.MultiStepLR(optimizer, [steps * 3 // 8, steps * 5 // 8, steps * 7 // 8], 0.1)

        def distance():
            images = torch.sigmoid(logits)
            loss = F.binary_cross_entropy_with_logits(model(to_model(images, model)).squeeze(1).float(), labels)
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            dot = sum((grad.double() * aim.double()).sum() for grad, aim in zip(grads, target))
            norm = torch.sqrt(sum(grad.double().square().sum() for grad in grads))
            prior = (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + (images[..., 1:] - images[..., :-1]).abs().mean()
            return 1 - dot / (norm * target_norm).clamp(min=1e-30), prior
        for _ in range(steps):
            mismatch, prior = distance()
            optimizer.zero_grad(set_to_none=True)
            (mismatch + tv * prior).backward()
            optimizer.step()
            decay.step()
        mismatch = float(distance()[0].detach())
        if best is None or mismatch < best[0]:
            best = mismatch, torch.sigmoid(logits).detach()
    return best[1]


def label_leak(client_model, server_model, images, labels, batch_size, defense=None):
    """What the gradients a label-private client returns tell the server about the labels.

    For each of a site's training images, the gradient of the loss with respect to the pooled features,
    which the client sends back (computed with the trained model, in the training batch size). With one
    logit and a linear head it is (sigmoid(logit) - label) times the head's weights: its direction is the
    label. Norm attack: the gradient's norm as the score (positives, the rarer and harder class, tend to
    have larger ones). Cosine attack: the cosine with one fixed gradient (the first): the gradients fall into
    two opposite directions, one per label; its AUROC is taken up to which direction is which
    (max(AUROC, 1 - AUROC)), since one known label is all the server needs to name them. Returns each
    attack's AUROC against the true labels (0.5: nothing learnt, 1: every label known). With `defense`, the
    gradients as the client returns them (with its gradient noise).
    """
    client_model, server_model = copy.deepcopy(client_model).train(), copy.deepcopy(server_model).train()
    gradients = []
    for start, end in batch_bounds(len(images), batch_size):
        batch = to_model(images[start:end], client_model)
        with torch.no_grad():
            features = server_model(client_model(batch))
        features.requires_grad_()
        logits = client_model.head(features).squeeze(1)
        F.binary_cross_entropy_with_logits(logits, labels[start:end].to(logits)).backward()
        grad_features = defense.gradient(features.grad, (start,))[0] if defense else features.grad
        gradients.append(grad_features)
    return label_attacks(torch.cat(gradients), labels)


def label_attacks(gradients, labels):
    """The norm and cosine label attacks (`label_leak`) on returned gradients of the pooled features, one row per
    image, as the server received them."""
    gradients, labels = gradients.double().cpu(), torch.as_tensor(labels).cpu()
    cosine = auroc(F.cosine_similarity(gradients, gradients[:1], dim=1), labels)
    return dict(norm_auroc=auroc(gradients.norm(dim=1), labels),
                cosine_auroc=None if cosine is None else max(cosine, 1 - cosine))


def whitebox_attack(client_model, activations, victim_images, attacker_images, batch_size, steps=1000, seed=0):
    """A server that holds the victim's client part as well (an aggregator in the same process) inverts the
    activations it received through the victim's own weights: `decode`, its decoder trained on the attacker's
    images passed through `client_model` (the weights the victim uploaded, as training runs them: train mode,
    its batch size), where the server alone trains through another client's copy. (An inversion by optimising
    images to match the activations, He et al.'s rMLE, fell from the prior's SSIM 0.703 to 0.676 at the default
    cut in a trial: these activations are no easy inverse problem.)"""
    known = sent_activations(client_model, attacker_images, batch_size, key=(seed, 2))
    return decode(known, attacker_images, activations, victim_images, steps, seed=seed)


def compared(reconstructed, victim_images, attacker_images, size=None):
    """SSIM and PSNR of reconstructions against the victim's images, and of the floor: the attacker's mean image
    (of `attacker_images`) offered as every victim image; at `size` (default: theirs, at most 64 px)."""
    size = size or min(victim_images.shape[-1], 64)
    shrink = lambda images: F.interpolate(images.float().cpu(), size=(size, size), mode="area")
    reconstructed, victim_images = shrink(reconstructed), shrink(victim_images)
    floor = shrink(attacker_images).mean(0, keepdim=True).expand_as(victim_images)
    return dict(ssim=float(ssim(reconstructed, victim_images).mean()), psnr=float(psnr(reconstructed, victim_images).mean()),
                ssim_floor=float(ssim(floor, victim_images).mean()), psnr_floor=float(psnr(floor, victim_images).mean()),
                target_size=size)


class Recorder(Observer):
    """What each party receives in a round, as it arrived (after any defense), for the measures of what it could
    learn (`measure`): nothing is computed again. Kept, each round: the activations the server receives from a
    seeded sample of each site's batches, at most `keep` images a site (every training image at the default
    sizes), with the indices of the images behind them; for the same batches, the gradients of the pooled
    features a label-private client returns; the images central's server receives (once); what the victim, site
    0, uploads for averaging, and its copy's state when the round began; what a peer client receives from the
    victim in a hand-off. Under a transport every process records the same schedule: real tensors where its
    party received them, shape-only placeholders elsewhere (`measure` brings them to the server's process)."""

    def __init__(self, train_sets, batch_size, seed=0, keep=256):
        self.train_sets, self.batch_size, self.seed, self.keep = train_sets, batch_size, seed, keep
        self.state, self.images, self.start = (), {}, None
        self.activations, self.gradients, self.counts, self.upload, self.handoff = {}, {}, {}, None, None

    def started(self, run, state):
        self.state = state  # its first entry: site 0's copy of what it trains (every loop registers it first)

    def round_started(self, run):
        self.activations, self.gradients, self.counts, self.upload, self.handoff = {}, {}, {}, None, None
        # site 0's starting weights, for the inversion of FedAvg's first update only (`measure`): a copy of the
        # whole model, on the round's clock, so not taken in any other round or scheme
        first = self.state[0] if self.state and isinstance(self.state[0], nn.Module) else None
        wanted = first is not None and run.scheme == "fedavg" and not run.history
        self.start = {key: value.detach().clone() for key, value in first.state_dict().items()} if wanted else None

    def sent(self, run, source, destination, link, objects):
        if link == "client->server" and run.scheme == "central":
            self.images[source] = objects[0]
        elif link == "client->server" and objects[0].dim() in (2, 4):  # activations, or returned feature gradients
            record = self.activations if objects[0].dim() == 4 else self.gradients
            batch = self.counts[source, objects[0].dim()] = self.counts.get((source, objects[0].dim()), -1) + 1
            indices = self.sampled(source, len(run.history)).get(batch)
            if indices is not None:
                record.setdefault(source, []).append((indices, objects[0].detach()))
        elif link == "client->aggregator" and source == 0:
            self.upload = {key: value.detach().clone() for key, value in objects[0].items()}
        elif link == "client->client" and source == 0 and self.handoff is None:
            self.handoff = destination, {key: value.detach().clone() for key, value in objects[0].items()}

    def sampled(self, site, round):
        """The batches of `site` kept in `round`, by their number, with the indices of their images: whole batches
        in a seeded order, while they fit in `keep` images."""
        order = shuffled(self.seed, site, round, len(self.train_sets[site]))
        bounds = batch_bounds(len(order), self.batch_size)
        kept, total = {}, 0
        for batch in torch.randperm(len(bounds), generator=torch.Generator().manual_seed(self.seed + 7919 * site + round)).tolist():
            start, end = bounds[batch]
            if total + end - start <= self.keep:
                kept[batch], total = order[start:end], total + end - start
        return kept

    def received(self, site, what="activations"):
        """(indices, tensors) a site sent this round that the recorder kept, in the order they were sent."""
        record = (self.activations if what == "activations" else self.gradients).get(site, [])
        if not record:
            return None, None
        return torch.cat([indices for indices, _ in record]), torch.cat([tensor.float() for _, tensor in record])


def entry(attacker, channel, victim, found=None, **measured):
    """One line of what leaks: who could learn (`attacker`: "server", "aggregator", "server+aggregator" where
    one process is both, "client K" for a peer), from what (`channel`: "images", "activations", "weights",
    "labels"), about whose data (`victim`, a site), and how much: `ssim` of its best reconstruction against
    `ssim_floor`, what its prior alone gives (the mean image of the images it knows), and `gain`, how far it got
    from the floor towards a perfect copy, (ssim - floor) / (1 - floor): 0 nothing, 1 everything (the
    normalised gain of Hatamizadeh et al. 2023's RDLV); or other measures (`dcor`, `label_auroc`)."""
    found = dict(found or {}, **measured)
    row = dict(attacker=attacker, channel=channel, victim=victim, ssim=found.get("ssim"), ssim_floor=found.get("ssim_floor"))
    row["gain"] = None if row["ssim"] is None else (row["ssim"] - row["ssim_floor"]) / max(1 - row["ssim_floor"], 1e-9)
    row.update({key: found[key] for key in ("dcor", "label_auroc", "psnr", "psnr_floor", "method") if key in found})
    return row


def measure(run, recorder, deployed, attack_steps=0, attempt=lambda what, function: function()):
    """What each party could learn from what it received in the round just ended (`recorder`), measured where the
    server is (its process under a transport; the images the measures compare with travel there as evaluation
    traffic). The victim is site 0; the server knows site 1's images (a colluding hospital, or public X-rays like
    its own), which also make its prior, and a peer client its own. Always: dCor² of every site's images and the
    activations it sent, the labels the server receives (returned gradients of a label-private client: the label
    attacks), central's images, a peer's prior. With `attack_steps`: the decoder on activations (`decode`), the
    white-box attack where the server also aggregates the client parts (`whitebox_attack`), the aggregator's
    inversion of FedAvg's update from the shared initial weights (`invert_update`, in the first round only:
    `attack_steps` / 5 steps, each a double backward pass of the whole model). Returns the round's measures and
    "leak", their `entry` lines (both empty in a process that is not the server's); `attempt(what, function)` runs
    each measure, so that a failing one is named and the others go on. `deployed`: each site's deployed model, the
    architecture into which an attacker loads the weights it received."""
    sites = range(len(run.train_sets))
    own = lambda site, indices: run.send_for_evaluation(site, "server", run.train_sets[site].images[indices],
                                                         run.train_sets[site].labels[indices])
    received = {site: recorder.received(site) for site in sites}
    indices = {site: received[site][0] if received[site][0] is not None else torch.arange(min(len(run.train_sets[site]), recorder.keep))
               for site in sites}
    images, labels = zip(*(own(site, indices[site]) for site in sites))
    inverts = run.scheme == "fedavg" and recorder.upload is not None and attack_steps and len(run.history) == 1
    start = run.send_for_evaluation(0, "server", recorder.start) if inverts else None  # (every process sends the same)
    if images[0].is_meta:  # not the server's process: it measures
        return {}, []
    found, leak = {}, []
    if run.scheme == "central":
        leak.append(entry("server", "images", 0, compared(recorder.images[0][indices[0]], images[0], images[1])))
    if received[0][1] is not None:  # a split scheme: the server receives activations
        leak += activation_attacks(run, recorder, deployed, received, images, attack_steps, attempt, found)
    if received[0][1] is not None and is_label_private(deployed[0][0]):
        returned = {site: recorder.received(site, "gradients") for site in sites}
        label_leak_of = attempt("label leak", lambda: [label_attacks(returned[site][1], labels[site][:len(returned[site][1])])
                                                       for site in sites])
        if label_leak_of:
            found["label_leak"] = label_leak_of
            leak.append(entry("server", "labels", 0, label_auroc=label_leak_of[0]["cosine_auroc"]))
    elif received[0][1] is not None or run.scheme == "central":
        leak.append(entry("server", "labels", 0, label_auroc=1.0))  # sent with the activations (or the images)
    if inverts:
        inversion = attempt("inversion", lambda: invert_update(deployed[0], start, recorder.upload,
                                                               images[0], images[1], max(attack_steps // 5, 1),
                                                               recorder.seed))
        if inversion:
            found["inversion"] = inversion
    if run.scheme == "fedavg":
        leak.append(entry("aggregator", "weights", 0, found.get("inversion")))
    if recorder.handoff is not None:
        # a peer holds the victim's client part and its Adam state, before and after the victim's turn, but neither
        # the server's half (no loss whose gradient it could invert) nor any of the victim's activations: its prior
        peer = recorder.handoff[0]
        prior = compared(images[peer].mean(0, keepdim=True).expand_as(images[0]), images[0], images[peer])
        leak.append(entry(f"client {peer}", "weights", 0, ssim_floor=prior["ssim_floor"], method="prior only"))
    return found, leak


def activation_attacks(run, recorder, deployed, received, images, attack_steps, attempt, found):
    """`measure`'s attackers of the activations a split scheme's server received (`received`: per site, the
    recorder's (indices, activations); `images`: the images behind them): dCor² and the decoder for the server,
    and where it aggregates the client parts too, the white-box attack. Adds to `found`; returns the lines."""
    sites, leak = range(len(images)), []
    dependence_of = attempt("dCor²", lambda: [dependence(images[site], received[site][1], recorder.seed) for site in sites])
    if dependence_of:
        found.update(dcor=[d["dcor"] for d in dependence_of], dcor_shuffled=[d["dcor_shuffled"] for d in dependence_of])
    attack = attack_steps and len(sites) > 1 and attempt("attack", lambda: decode(
        received[1][1], images[1], received[0][1], images[0], attack_steps, seed=recorder.seed))
    if attack:
        found["attack"] = attack
    leak.append(entry("server", "activations", 0, attack or None, **({"dcor": found["dcor"][0]} if "dcor" in found else {})))
    if recorder.upload is not None and attack_steps:  # SplitFed v1, v2: the server aggregates the client parts too
        whitebox = attempt("white-box attack", lambda: whitebox_attack(
            part_with(deployed[0][0], recorder.upload), received[0][1], images[0], images[1],
            run.batch_size, attack_steps, recorder.seed))
        if whitebox:
            found["whitebox"] = whitebox
        # it holds what the server alone holds too, and keeps whichever reconstruction is better
        best = max((attack or None, whitebox), key=lambda found: -1 if not found else found["ssim"])
        leak.append(entry("server+aggregator", "activations", 0, best,
                          method=None if not best else "white-box" if best is whitebox else "black-box"))
    return leak


def part_with(part, state):
    """A copy of model part `part` holding `state` (a state dict another party sent), real even where this process
    held only a stand-in of the part (under a transport), on the device `state` is on."""
    copied = unwrap(copy.deepcopy(part))
    if next(copied.parameters()).is_meta:
        copied = copied.to_empty(device=next(iter(state.values())).device)
    # by position: a stand-in's state (a transport's parts are stand-ins, `common.StandIn`) names the same tensors
    # in the same order under other names
    copied.load_state_dict(dict(zip(copied.state_dict(), state.values())))
    return copied.to(memory_format=torch.contiguous_format)  # one layout, whichever the part had: the same sums


def invert_update(model, start, uploaded, victim_images, attacker_images, steps=1000, seed=0, num_images=8):
    """The aggregator's attack on FedAvg: the weights a client uploaded minus those it started the round from (one
    local epoch of Adam) taken as the gradient's direction (`invert_gradient` matches directions, so the learning
    rate does not matter), inverted for `num_images` images (the attacker does not know how many were behind the
    update, nor their labels: half of each, the prior of a balanced site) with the model at the round's start in
    train mode, as the client trained it, from the attacker's prior (its mean image). Each reconstruction is compared with the victim's image it resembles
    most, and the floor (the attacker's mean image) likewise."""
    model = part_with(model, start).train()
    start, uploaded = (dict(zip(model.state_dict(), state.values())) for state in (start, uploaded))  # by position
    gradients = [start[name].double() - uploaded[name].double() for name, _ in model.named_parameters()]
    labels = (torch.arange(num_images) % 2).float()
    reconstructed = invert_gradient(model, gradients, labels, victim_images.shape[1:], steps, seed,
                                    start=attacker_images.mean(0, keepdim=True))
    return best_matches(reconstructed, victim_images, attacker_images)


CURVE = ((1, 1), (4, 1), (8, 1), (8, 2), (8, 8))  # (images, local steps) of the FedAvg inversion curve


def inversion_curve(model, victim_images, victim_labels, attacker_images, lr=1e-3, steps=1000, seed=0,
                    settings=CURVE, log=print):
    """Where FedAvg starts to leak: for each (images, local steps) of `settings`, a client trains a copy of
    `model` (train mode) with Adam (`lr`) for that many steps on its first that many images, all of them each
    step, and the aggregator inverts its update (the weights before minus after, `invert_gradient` for `steps`
    steps from the attacker's mean image, knowing the labels); each reconstruction against the victim's image
    it matches best (`best_matches`). One image needs at least 64 px: in train mode DenseNet-121's last block
    then still has 2 x 2 values a channel for BatchNorm (at 48 px one: that client cannot train, and its row
    says so in "error")."""
    rows = []
    for num_images, local_steps in settings:
        images, labels = victim_images[:num_images], victim_labels[:num_images].float()
        client = copy.deepcopy(model).train()
        start = {name: weight.detach().clone() for name, weight in client.named_parameters()}
        optimizer = torch.optim.Adam(client.parameters(), lr=lr)
        try:
            for _ in range(local_steps):
                loss = F.binary_cross_entropy_with_logits(client(to_model(images, client)).squeeze(1).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        except ValueError as error:  # BatchNorm in train mode with one value a channel: no client trains this way
            rows.append(dict(images=num_images, local_steps=local_steps, error=str(error).split(",")[0]))
            log and log(f"inversion: {num_images} images, {local_steps} local steps: {rows[-1]['error']}")
            continue
        update = [start[name].double() - weight.detach().double() for name, weight in client.named_parameters()]
        begun = copy.deepcopy(model).train()  # the weights the aggregator sent: the update's starting point
        reconstructed = invert_gradient(begun, update, labels, images.shape[1:], steps, seed,
                                        start=attacker_images.mean(0, keepdim=True))
        rows.append(dict(best_matches(reconstructed, images, attacker_images), images=num_images,
                         local_steps=local_steps, steps=steps))
        if log:
            log(f"inversion: {num_images} images, {local_steps} local steps: SSIM {rows[-1]['ssim']:.3f} "
                f"(floor {rows[-1]['ssim_floor']:.3f})")
    return rows


def best_matches(reconstructed, victim_images, attacker_images):
    """`compared`, each reconstruction against the victim's image whose SSIM with it is highest, and the floor
    (the attacker's mean image) against the victim's image it matches best."""
    size = min(victim_images.shape[-1], 64)
    shrink = lambda images: F.interpolate(images.float().cpu(), size=(size, size), mode="area")
    reconstructed, victims, prior = shrink(reconstructed), shrink(victim_images), shrink(attacker_images).mean(0, keepdim=True)
    best = lambda image: int(max(range(len(victims)), key=lambda i: float(ssim(image[None], victims[i:i + 1]))))
    matched = victims[[best(image) for image in reconstructed]]
    return dict(ssim=float(ssim(reconstructed, matched).mean()), psnr=float(psnr(reconstructed, matched).mean()),
                ssim_floor=float(ssim(prior, victims[best(prior[0]):best(prior[0]) + 1]).mean()), target_size=size,
                num_images=len(reconstructed))


# How much each measure of one round says the server learnt (more is worse): dCor² (mean over sites), an
# attack's SSIM above its floor, the cosine label attack's AUROC (mean over sites; undefined counts as chance).
above_floor = lambda key: lambda found: found[key]["ssim"] - found[key]["ssim_floor"]
LEAKED = dict(dcor=lambda found: statistics.mean(found["dcor"]), attack=above_floor("attack"),
              whitebox=above_floor("whitebox"), inversion=above_floor("inversion"),
              label_leak=lambda found: statistics.mean(site["cosine_auroc"] or 0.5 for site in found["label_leak"]))


def leaked(line):
    """How much a leak line says its attacker learnt, to rank lines: the gain over the floor where an attack
    reconstructed images, else dCor², else the label AUROC (each on its own 0-to-1 scale)."""
    for key in ("gain", "dcor", "label_auroc"):
        if line.get(key) is not None:
            return line[key]
    return -math.inf


def worst_leaks(history):
    """A run's leak: per attacker, channel and victim, the line of the round it learnt most in (`leaked`; the
    earliest of equals), with that round; and the worst line of all where an attack reconstructed images (by gain:
    one scale for every scheme), None where none did."""
    by_line = {}
    for round_entry in history:
        for line in (round_entry.get("privacy") or {}).get("leak", []):
            key = line["attacker"], line["channel"], line["victim"]
            if key not in by_line or leaked(line) > leaked(by_line[key]):
                by_line[key] = dict(line, round=round_entry["round"])
    lines = list(by_line.values())
    return lines, max((line for line in lines if line["gain"] is not None), key=lambda line: line["gain"], default=None)


def cuts_sweep(client_model, server_model, train_sets, batch_size, attack=False, steps=1000, log=print):
    """dCor² (and with `attack` the reconstruction) at every cut of one trained model, for site 0's images
    (the attacker: site 1's images)."""
    model = merge(client_model, server_model)
    rows = []
    for cut in CUTS:
        client_part, _ = split_model(model, cut)
        row = dict(cut=cut, **leakage(client_part, train_sets[0].images, batch_size))
        if attack:
            row.update(reconstruction_attack(client_part, train_sets[1].images, train_sets[0].images, batch_size, steps))
        rows.append(row)
        if log:
            log(f"cut {cut}: dCor² {row['dcor']:.3f} (shuffled {row['dcor_shuffled']:.3f})"
                + (f", SSIM {row['ssim']:.3f} (floor {row['ssim_floor']:.3f})" if attack else ""))
    return rows
