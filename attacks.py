"""What an attacker does with what it received, and how well it did: the measures, the attacks, their settings.

- `distance_correlation`: statistical dependence between the images and the activations a site sends (bias-corrected,
  so 0 means independent and 1 a distance-preserving map), and the same with the pairs shuffled beside it
  (`dependence`): the value that means nothing.
- `decode`, `reconstruction_attack`: the server trains a decoder on another site's images and their activations (He,
  Zhang and Lee, ACSAC 2019: a black-box inverse network) and inverts the victim site's activations; SSIM and PSNR,
  next to the floor of predicting the attacker's mean image for every victim image (`compared`).
- FedAvg's aggregator inverting an update: `inversion.py`.
- `label_leak`: in a label-private (U-shaped) split the labels stay home, but the gradients the client returns for
  the pooled features still carry them (Li et al., ICLR 2022): the norm and cosine attacks.
- `cuts_sweep`: dCor² and the decoder at every cut of one trained model.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import report
from common import auroc, batch_bounds, bce, to_model
from densenet_split import CUTS, merge, split_model
from labelprivate import plain
from standins import unwrap


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


def shrunk(images, size):
    """`images` compared at `size` x `size` pixels (area averaging), in float32 on the CPU."""
    return F.interpolate(images.float().cpu(), size=(size, size), mode="area")


def assignment(gains):
    """The one-to-one assignment of rows to columns (rows <= columns) that maximises the summed `gains` (a k x n
    tensor): for each row, its column. The Hungarian method with potentials (Kuhn 1955, Munkres 1957), O(k^2 n)."""
    cost = (-gains.double()).tolist()
    rows, columns = len(cost), len(cost[0])
    u, v, owner, way = [0.0] * (rows + 1), [0.0] * (columns + 1), [0] * (columns + 1), [0] * (columns + 1)
    for row in range(1, rows + 1):  # add each row in turn, along a shortest augmenting path
        owner[0], column = row, 0
        slack, used = [float("inf")] * (columns + 1), [False] * (columns + 1)
        while owner[column]:
            used[column], current, delta, nearest = True, owner[column], float("inf"), 0
            for j in range(1, columns + 1):
                if not used[j]:
                    reduced = cost[current - 1][j - 1] - u[current] - v[j]
                    if reduced < slack[j]:
                        slack[j], way[j] = reduced, column
                    if slack[j] < delta:
                        delta, nearest = slack[j], j
            for j in range(columns + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    slack[j] -= delta
            column = nearest
        while column:
            owner[column], column = owner[way[column]], way[column]
    matched = [0] * rows
    for column in range(1, columns + 1):
        if owner[column]:
            matched[owner[column] - 1] = column - 1
    return matched


def compared(reconstructed, victim_images, attacker_images, size=None, paired=True):
    """How well an attacker did, on the scale every attacker shares. Its prior is the mean image of the images it
    knows (`attacker_images`), offered as every victim image: the floor. Its output, per victim image, is the
    better (by SSIM) of its reconstruction and that prior, since it can always offer the prior: no attack scores
    below the floor. `paired`: reconstruction i is of victim image i (a decoder of activations the victim sent);
    otherwise the attacker does not know whose image it drew (an inversion of an update), and each reconstruction
    is assigned to a different victim image, the assignment that helps most (`assignment`), the rest keep the
    prior. Images compared at `size` (default: theirs, at most 64 px). Returns the mean SSIM and PSNR over the
    victim images and of the floor, the reconstructions' own mean SSIM (`ssim_reconstructed`, which may be below
    the floor), how many victim images they beat the prior on (`better`), and a 95% interval of the gain, (SSIM - floor)
    / (1 - floor) (`gain_interval`: a percentile bootstrap over the victim images, in [0, 1] as the gain is)."""
    size = size or min(victim_images.shape[-1], 64)
    reconstructed, victims = shrunk(reconstructed, size), shrunk(victim_images, size)
    prior = shrunk(attacker_images, size).mean(0, keepdim=True).expand_as(victims)
    prior_ssim, prior_psnr = ssim(prior, victims), psnr(prior, victims)
    if paired:
        drawn = torch.arange(len(reconstructed))
    else:  # every reconstruction against every victim image: k x n
        similarity = torch.stack([ssim(image[None].expand_as(victims), victims) for image in reconstructed])
        drawn = torch.tensor(assignment((similarity - prior_ssim).clamp(min=0)))
    own_ssim, own_psnr = ssim(reconstructed, victims[drawn]), psnr(reconstructed, victims[drawn])
    best_ssim, best_psnr = prior_ssim.clone(), prior_psnr.clone()
    better = own_ssim > prior_ssim[drawn]
    best_ssim[drawn[better]], best_psnr[drawn[better]] = own_ssim[better], own_psnr[better]
    # the gain's interval: a seeded bootstrap over the victim images, each resample's gain on its own floor
    resamples = torch.randint(len(victims), (1000, len(victims)), generator=torch.Generator().manual_seed(0))
    best, prior = best_ssim.double()[resamples].mean(1), prior_ssim.double()[resamples].mean(1)
    gains = (best - prior) / (1 - prior).clamp(min=1e-9)
    low, high = torch.quantile(gains, torch.tensor([0.025, 0.975], dtype=gains.dtype)).tolist()
    return dict(ssim=float(best_ssim.mean()), psnr=float(best_psnr.mean()), ssim_floor=float(prior_ssim.mean()),
                psnr_floor=float(prior_psnr.mean()), ssim_reconstructed=float(own_ssim.mean()), better=int(better.sum()),
                num_images=len(victims), target_size=size, gain_interval=[low, high])


class Decoder(nn.Module):
    """The attacker's inverse network: activations (C x h x w) to a 1 x size x size image.

    It starts at the floor: its last convolution is zero and a learned template, the attacker's mean image,
    is added before the sigmoid, so that what it learns is the margin above offering the mean image. (Without
    the template, a cut whose activations are 1 x 1 could only be upsampled into flat images, far below the
    floor: docs/privacy.md.)"""

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


def decode(known, attacker_images, victim, victim_images, steps=1000, target_size=None, seed=0, held_out=0.2):
    """He, Zhang and Lee's black-box attack on activations as the attacker received them: `Decoder` trained with
    Adam for `steps` steps on the pairs it knows (`known` activations of `attacker_images`), then applied to the
    victim's activations (`victim`) and compared with `victim_images` (`compared`) at `target_size` (default:
    their own size; larger than 64 px, 64 x 64). Early stopping: a seeded `held_out` share of the pairs (from 10
    pairs on) is kept out of training, and the decoder is kept as it was when its error on them was lowest,
    checked 20 times; `held_out` 0 trains on every pair to the end (an oracle given the victim's own pairs)."""
    size = target_size or min(attacker_images.shape[-1], 64)
    known, victim = known.float(), victim.float()
    known_images, victim_images = (shrunk(images, size).to(known.device) for images in (attacker_images, victim_images))
    mean_image = known_images.mean(0, keepdim=True)
    generator = torch.Generator().manual_seed(seed)  # the decoder's start and its batches: the same on every device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = Decoder(known.shape[1], size, mean_image.cpu()).to(known.device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    order = torch.randperm(len(known), generator=generator)
    checked = order[:int(len(known) * held_out)] if len(known) >= 10 else order[:0]
    trained, best, kept_at, kept = order[len(checked):], float("inf"), steps, None
    for step in range(1, steps + 1):
        batch = trained[torch.randint(len(trained), (min(32, len(trained)),), generator=generator)]
        loss = F.mse_loss(decoder(known[batch]), known_images[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if len(checked) and (step % max(steps // 20, 1) == 0 or step == steps):
            with torch.no_grad():
                error = float(F.mse_loss(decoder.eval()(known[checked]), known_images[checked]))
            decoder.train()
            if error < best:
                best, kept_at, kept = error, step, copy.deepcopy(decoder.state_dict())
    if kept is not None:
        decoder.load_state_dict(kept)
    with torch.no_grad():
        reconstructed = decoder.eval()(victim)
    return dict(compared(reconstructed, victim_images, known_images, size), steps=steps, kept_at=kept_at)


def total_variation(images):
    """The mean absolute difference of neighbouring pixels, down and across: the smoothness prior of inversions."""
    return (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + (images[..., 1:] - images[..., :-1]).abs().mean()


def invert_activations(client_model, activations, attacker_images, batch_sizes, steps=1000, seed=0, lr=0.05, tv=0.01):
    """He, Zhang and Lee's white-box rMLE: images in [0, 1] whose activations through `client_model` (a copy, in
    train mode, in the victim's batches of `batch_sizes` images, as it ran them) match the `activations` received
    (squared error relative to theirs), with a total-variation prior of weight `tv`: Adam (`lr`) on images
    parameterised by a sigmoid, from the attacker's prior (its mean image, a little noise apart), the rate divided
    by ten at 3/8, 5/8 and 7/8 of `steps`."""
    model = copy.deepcopy(client_model).train().requires_grad_(False)
    target = activations.float()
    prior = attacker_images.float().mean(0, keepdim=True).to(target.device)
    noise = torch.randn(len(target), *prior.shape[1:], generator=torch.Generator().manual_seed(seed)).to(target.device)
    logits = (torch.logit(prior, eps=1e-3) + 0.1 * noise).requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=lr)
    decay = torch.optim.lr_scheduler.MultiStepLR(optimizer, [steps * 3 // 8, steps * 5 // 8, steps * 7 // 8], 0.1)
    ends = torch.tensor(batch_sizes).cumsum(0).tolist()
    for _ in range(steps):
        images = torch.sigmoid(logits)
        sent = torch.cat([model(to_model(images[end - size:end], model)) for size, end in zip(batch_sizes, ends)])
        loss = (sent.float() - target).square().sum() / target.square().sum().clamp(min=1e-30) + tv * total_variation(images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
    return torch.sigmoid(logits).detach()


def whitebox_attack(client_models, activations, victim_images, attacker_images, batch_size, batch_sizes, steps=1000,
                    seed=0):
    """An attacker that holds weights of the victim's client part (`client_models`, copies holding each state it
    received: a SplitFed aggregator's upload and the average it sent, a colluding peer's hand-off) besides the
    victim's `activations`: the better of `decode` with its pairs made through each of them (its own images
    passed through them as training runs them: train mode, in the batch size) and `invert_activations` through
    the last (an eighth as many steps). The weights are those of a moment in the round; the activations came from the
    weights of theirs, a few steps apart (docs/privacy.md measures the cost)."""
    known = torch.cat([sent_activations(model, attacker_images, batch_size, key=(seed, 2)) for model in client_models])
    decoded = decode(known, attacker_images.repeat(len(client_models), 1, 1, 1), activations, victim_images, steps, seed=seed)
    # (rMLE at an eighth of the steps: each passes every victim image through the client part and back, about what
    # the decoder's steps on batches of 32 cost in all)
    inverted = invert_activations(client_models[-1], activations, attacker_images, batch_sizes, max(steps // 8, 1), seed)
    found = [dict(decoded, method="white-box decoder"),
             dict(compared(inverted, victim_images, attacker_images), method="rMLE", steps=max(steps // 8, 1))]
    return max(found, key=lambda one: one["ssim"])


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
        bce(client_model.head(features), labels[start:end].to(features)).backward()
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


def cuts_sweep(client_model, server_model, train_sets, batch_size, attack=False, steps=1000, log=print):
    """dCor² (and with `attack` the reconstruction) at every cut of one trained model, for site 0's images
    (the attacker: site 1's images)."""
    model = merge(*plain(client_model, server_model) if hasattr(client_model, "head") else (client_model, server_model))
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


def sweep_experiment(scheme, model, train_sets, batch_size, attack, steps, plot, attempt):
    """bench.py --cuts-sweep: the server's view at every cut of one trained model (`cuts_sweep`), printed, and its
    plot beside `plot`; `attempt(what, function)` runs each step, so that one that fails is named."""
    print(f"\nthe server's view at every cut of {scheme}'s model (site 0's training images"
          f"{'; the attacker: site 1' if attack else ''}):")
    cuts = attempt("cuts sweep", lambda: cuts_sweep(model[0], model[1], train_sets, batch_size, attack=attack, steps=steps))
    if cuts:
        print(report.cuts_table(cuts))
        if plot:
            attempt("cuts plot", lambda: report.plot_cuts(cuts, plot.removesuffix(".png") + "-cuts.png"))
