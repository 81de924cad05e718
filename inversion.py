"""What FedAvg's aggregator can invert of what it receives, a client's update: the client's local training replayed
(`simulated_update`), images fitted to a gradient or an update (`invert_gradient`, Geiping et al. 2020), with the
BatchNorm statistics the upload carries as a prior (`statistics_change`, `recording_moments`, `statistics_error`),
the bench's attack on the first update (`invert_update`) and where FedAvg starts to leak (`inversion_curve`,
`--inversion-curve`). Scored on the attackers' one scale (`attacks.compared`).
"""
import copy

import torch
from torch import nn

import report
from attacks import compared, part_with, total_variation
from common import batch_bounds, bce, to_model
from densenet_split import split_densenet121


def simulated_update(model, weights, images, labels, training=None):
    """What a client's weights change by (before minus after) when it trains `model`, holding `weights` (its
    parameters, in order), on `images` with `labels` as `training` says: {"optimizer": "sgd" or "adam" (torch's
    defaults, from a fresh state), "lr", "steps", "batch_size"}: the batches in order, cycled, in train mode. With
    `training` None, the loss's gradient itself (DLG's setting). Differentiable in `images` (each step's gradient
    is taken with create_graph), so that an attacker can fit images to an update."""
    if training is None:
        return torch.autograd.grad(bce(model(to_model(images, model)), labels), weights, create_graph=True)
    names = [name for name, _ in model.named_parameters()]
    current, first, second = list(weights), None, None
    bounds = batch_bounds(len(images), training["batch_size"])
    for step in range(1, training["steps"] + 1):
        begin, end = bounds[(step - 1) % len(bounds)]
        logits = torch.func.functional_call(model, dict(zip(names, current)), (to_model(images[begin:end], model),))
        grads = torch.autograd.grad(bce(logits, labels[begin:end]), current, create_graph=True)
        if training["optimizer"] == "sgd":
            current = [weight - training["lr"] * grad for weight, grad in zip(current, grads)]
            continue
        first = [0.1 * grad if first is None else 0.9 * m + 0.1 * grad for m, grad in zip(first or grads, grads)]
        second = [0.001 * grad * grad if second is None else 0.999 * v + 0.001 * grad * grad
                  for v, grad in zip(second or grads, grads)]
        # (Adam's step; the 1e-30 keeps the square root's derivative finite where a gradient is exactly 0)
        current = [weight - training["lr"] * (m / (1 - 0.9 ** step)) / ((v / (1 - 0.999 ** step) + 1e-30).sqrt() + 1e-8)
                   for weight, m, v in zip(current, first, second)]
    return [weight - after for weight, after in zip(weights, current)]


def batchnorm_layers(model):
    return [layer for layer in model.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]


def statistics_change(start, uploaded, model, momentum=0.1):
    """What a client's local steps added to each BatchNorm layer's running statistics (of `model`, in its order), as
    the aggregator reads it from the state it sent (`start`) and the one uploaded: after k steps a running statistic
    is (1 - m)^k times where it began plus the sum over steps i of m (1 - m)^(k - i) times step i's batch statistic,
    so the upload less (1 - m)^k times the start is that weighted sum of the batches' means and (unbiased) variances,
    per channel: (mean, variance) a layer. k from `num_batches_tracked` (`local_steps`)."""
    decay = (1 - momentum) ** local_steps(start, uploaded, 0)
    names = {layer: name for name, layer in model.named_modules()}
    return [tuple(uploaded[f"{names[layer]}.{key}"].double() - decay * start[f"{names[layer]}.{key}"].double()
                  for key in ("running_mean", "running_var")) for layer in batchnorm_layers(model)]


def recording_moments(model):
    """Hooks `model`'s BatchNorm layers (`batchnorm_layers`) to record, as it runs, each batch's mean and (unbiased)
    variance per channel of what a layer normalises, differentiably: {layer's index: [(mean, variance) a forward
    pass]}, the dict it returns (clear it between replays)."""
    moments = {}
    note = lambda index: lambda layer, inputs: moments.setdefault(index, []).append(
        (inputs[0].mean((0, 2, 3)), inputs[0].var((0, 2, 3))))
    for index, layer in enumerate(batchnorm_layers(model)):
        layer.register_forward_pre_hook(note(index))
    return moments


def statistics_error(moments, statistics, momentum=0.1):
    """How far the running statistics that the batches of `moments` (`recording_moments`, one replay) add up to are
    from `statistics` (`statistics_change`): the squared error over every layer and channel relative to the
    statistics' own square, 0 where they match."""
    error, total = 0, 0.0
    for index, aims in enumerate(statistics):
        for number, step in enumerate(moments[index], 1):
            weight = momentum * (1 - momentum) ** (len(moments[index]) - number)
            aims = [aim - weight * moment.double() for aim, moment in zip(aims, step)]
        error = error + sum(aim.square().sum() for aim in aims)
        total += sum(float(aim.square().sum()) for aim in statistics[index])
    return error / max(total, 1e-30)


def invert_gradient(model, gradients, labels, image_shape, steps=2000, seed=0, restarts=1, lr=0.1, tv=1e-4, start=None,
                    training=None, statistics=None, bn=1.0, momentum=0.1):
    """Images in [0, 1], shape (N, *image_shape), whose gradient of the package's loss (BCE with logits on one
    logit, mean over the batch) with respect to `model.parameters()`, in that order, matches `gradients`: what
    a party that holds the model and receives a gradient can reconstruct of the images behind it; with
    `training`, images whose `simulated_update` matches `gradients`, an update (breaching's multi-step user:
    the attacker replays the client's local training on its candidate images).

    Geiping et al. 2020 ("Inverting Gradients"): the distance is 1 - the cosine similarity of the two,
    all parameters at once (blind to the update's scale); Adam (`lr`) on images parameterised by a sigmoid, so
    that they stay in [0, 1], its rate divided by ten at 3/8, 5/8 and 7/8 of `steps`; a total-variation prior of
    weight `tv`; `restarts` random starts (seeded by `seed`; `start`: images to begin from instead, such as the
    attacker's prior, each a little apart), of which the one that matches best is kept. `labels` (N floats) are
    given to the attacker. The model runs as it is (a client's in train mode normalises by the batch, as its
    training did), on a copy: its weights and statistics are untouched. With `training` and `statistics` (what the
    update added to the running BatchNorm statistics: `statistics_change`), the replay's batch means and variances,
    summed as the running statistics sum them (`momentum`), must match those too: a prior of weight `bn` on the
    relative squared error (GradInversion's, Yin et al. 2021, with the exact statistics the upload carries)."""
    model = copy.deepcopy(model)
    moments = recording_moments(model) if statistics is not None else {}
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
            moments.clear()
            simulated = simulated_update(model, weights, images, labels, training)
            dot = sum((grad.double() * aim.double()).sum() for grad, aim in zip(simulated, target))
            norm = torch.sqrt(sum(grad.double().square().sum() for grad in simulated))
            off = 0 if statistics is None else statistics_error(moments, statistics, momentum)
            return 1 - dot / (norm * target_norm).clamp(min=1e-30), total_variation(images) * tv + bn * off
        for _ in range(steps):
            mismatch, prior = distance()
            optimizer.zero_grad(set_to_none=True)
            (mismatch + prior).backward()
            optimizer.step()
            decay.step()
        mismatch = float(distance()[0].detach())
        if best is None or mismatch < best[0]:
            best = mismatch, torch.sigmoid(logits).detach()
    return best[1]


def local_steps(start, uploaded, default):
    """How many steps a client took between two of its states: BatchNorm's `num_batches_tracked` counts them (the
    aggregator receives it with the weights); `default` for a model without one."""
    counted = [uploaded[name] - start[name] for name in start if name.endswith("num_batches_tracked")]
    return int(counted[0]) if counted else default


def invert_update(model, start, uploaded, victim_images, victim_labels, attacker_images, batch_size, lr,
                  optimizer="adam", steps=1000, seed=0, bn=1.0):
    """The aggregator's attack on FedAvg's first update. It holds the weights it sent (`start`), those the client
    uploaded, the client's number of images (FedAvg's weight: len(victim_images)), and the protocol: the
    optimizer from a fresh state, its `lr`, the `batch_size`; the local steps it reads from the upload
    (`local_steps`). It replays that local training on as many candidate images as the client had, in train mode
    from `start` (`simulated_update`), and fits them to the update (`invert_gradient`, from its prior, the mean
    of `attacker_images`), given the labels in the client's order (`victim_labels`: an upper bound on an attacker
    that must infer them). It does not know which victim image each candidate is: `compared` assigns them one to
    one. `bn`: the weight of the prior of the BatchNorm statistics the upload carries (`statistics_change`; 0:
    none)."""
    model = part_with(model, start).train()
    start, uploaded = (dict(zip(model.state_dict(), state.values())) for state in (start, uploaded))  # by position
    update = [start[name].double() - uploaded[name].double() for name, _ in model.named_parameters()]
    training = dict(optimizer=optimizer, lr=lr, batch_size=batch_size,
                    steps=local_steps(start, uploaded, len(batch_bounds(len(victim_images), batch_size))))
    statistics = statistics_change(start, uploaded, model) if bn else None
    reconstructed = invert_gradient(model, update, victim_labels.float(), victim_images.shape[1:], steps, seed,
                                    start=attacker_images.mean(0, keepdim=True), training=training,
                                    statistics=statistics, bn=bn)
    return dict(compared(reconstructed, victim_images, attacker_images, paired=False), local_steps=training["steps"],
                optimizer=optimizer, steps=steps, bn=bn, method=f"replayed {optimizer}" + (" + BN" if bn else ""))


CURVE = ((1, 1), (4, 1), (8, 1), (8, 2), (8, 8))  # (images, local steps) of the FedAvg inversion curve


def inversion_curve(model, victim_images, victim_labels, attacker_images, lr=1e-3, steps=1000, seed=0,
                    settings=CURVE, optimizers=("sgd", "adam"), bn=1.0, log=print):
    """Where FedAvg starts to leak: for each optimizer and (images, local steps) of `settings`, a client trains a
    copy of `model` (train mode) for that many steps on its first that many images, all of them each step (FedSGD's
    setting at one step with SGD, the literature's), and the aggregator inverts its update by replaying that
    training (`invert_gradient` with `training`, `steps` steps from the attacker's mean image, knowing the
    labels, with the prior of the BatchNorm statistics its upload carries at weight `bn`); scored by `compared`, the
    reconstructions assigned one to one. One image needs at least 64 px: in
    train mode DenseNet-121's last block then still has 2 x 2 values a channel for BatchNorm (at 48 px one: that
    client cannot train, and its row says so in "error")."""
    rows = []
    for name in optimizers:
        for num_images, steps_taken in settings:
            images, labels = victim_images[:num_images], victim_labels[:num_images].float()
            training = dict(optimizer=name, lr=lr, steps=steps_taken, batch_size=num_images)
            setting = dict(optimizer=name, images=num_images, local_steps=steps_taken)
            client = copy.deepcopy(model).train()
            start = [weight.detach().clone() for weight in client.parameters()]
            step = (torch.optim.SGD if name == "sgd" else torch.optim.Adam)(client.parameters(), lr=lr)
            try:
                for _ in range(steps_taken):
                    loss = bce(client(to_model(images, client)), labels)
                    step.zero_grad(set_to_none=True)
                    loss.backward()
                    step.step()
            except ValueError as error:  # BatchNorm in train mode with one value a channel: no client trains this way
                rows.append(dict(setting, error=str(error).split(",")[0]))
                log and log(f"inversion: {name}, {num_images} images, {steps_taken} local steps: {rows[-1]['error']}")
                continue
            update = [before.double() - weight.detach().double() for before, weight in zip(start, client.parameters())]
            begun = copy.deepcopy(model).train()  # the weights the aggregator sent: the update's starting point
            statistics = statistics_change(begun.state_dict(), client.state_dict(), begun) if bn else None
            reconstructed = invert_gradient(begun, update, labels, images.shape[1:], steps, seed,
                                            start=attacker_images.mean(0, keepdim=True), training=training,
                                            statistics=statistics, bn=bn)
            rows.append(dict(compared(reconstructed, images, attacker_images, paired=False), **setting, steps=steps, bn=bn))
            if log:
                log(f"inversion: {name}, {num_images} images, {steps_taken} local steps: SSIM {rows[-1]['ssim']:.3f} "
                    f"(floor {rows[-1]['ssim_floor']:.3f})")
    return rows


def curve_experiment(train_sets, cut, lr, steps, json_path=None):
    """bench.py --inversion-curve: where FedAvg starts to leak (`inversion_curve`), site 0 the victim, site 1's images
    the prior, from seed 0's initial weights (every scheme's first run's); the table printed, the rows returned (and
    written to `json_path`)."""
    torch.manual_seed(0)
    model = nn.Sequential(*split_densenet121(cut)).to(memory_format=torch.channels_last)
    print(f"FedAvg's update inverted by the aggregator ({train_sets[0].images.shape[-1]} px, {steps} steps, the seed's "
          f"initial weights, labels known, the prior: site 1's mean image):", flush=True)
    rows = inversion_curve(model, train_sets[0].images, train_sets[0].labels, train_sets[1].images, lr, steps, seed=0,
                           log=lambda line: print(line, flush=True))
    print(report.curve_table(rows))
    if json_path:
        report.write_json(rows, json_path)
    return rows
