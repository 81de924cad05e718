"""Split learning: the client part of the network stays with the clients, the server part at the server.

One client part and one server part. Clients take turns: with turns="client" each trains one whole local
epoch, then hands the client part (and its optimizer state) to the next; with turns="batch" they hand it on
after every mini-batch, and a client whose data ran out is skipped until the round ends. The clients take
their turns in site order every round (order="fixed", as the paper did) or in a seeded order drawn anew
each round (order="shuffled"), so that no site always trains last.
A label-private client part (`densenet_split.label_private`, `common.LabelPrivateClient`) keeps the classifier head and the loss at the
client (a U-shaped split: `label_private_step`).
To reuse: copy this file with common.py.
"""
import numpy as np
import torch

from common import Run, is_label_private, split_flops

TURNS = ("client", "batch")


def split_step(run, site, client_model, server_model, client_optimizer, server_optimizer, images, labels, flops):
    """One training step of client `site` across the cut; `flops` = (client, server) training FLOPs per sample."""
    with run.autocast():
        outputs = client_model(images)  # client: forward to the cut
    outputs = run.defend(site, images, outputs)  # the client's defense, if any (privacy.Defense)
    # What leaves the client: the activations without their graph, and the labels; never the images.
    activations, labels = run.send(site, "server", outputs.detach(), labels)
    activations.requires_grad_()
    with run.autocast():
        loss = run.loss(server_model(activations), labels)  # server: the rest of the network and the loss
    server_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    server_optimizer.step()
    grad_activations = run.send("server", site, activations.grad)
    client_optimizer.zero_grad(set_to_none=True)
    outputs.backward(grad_activations)  # client: backward from the cut, then its own step
    client_optimizer.step()
    run.compute("client", flops[0] * len(labels))
    run.compute("server", flops[1] * len(labels))


def label_private_step(run, site, client_model, server_model, client_optimizer, server_optimizer, images, labels,
                       flops):
    """One step of a label-private (U-shaped) split: the client keeps the classifier head and the loss, so
    the labels never leave it; the server sends back the pooled features and receives their gradient."""
    with run.autocast():
        outputs = client_model(images)  # client: forward to the cut
    outputs = run.defend(site, images, outputs)  # the client's defense, if any (privacy.Defense)
    activations = run.send(site, "server", outputs.detach()).requires_grad_()  # no labels
    with run.autocast():
        features = server_model(activations)  # server: on to the pooled features
    received = run.send("server", site, features.detach()).requires_grad_()
    with run.autocast():
        loss = run.loss(client_model.head(received), labels)  # client: the head and the loss
    client_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_features = run.send(site, "server", run.defend_gradient(site, received.grad))
    server_optimizer.zero_grad(set_to_none=True)
    features.backward(grad_features)  # server: backward from the features, then its step
    server_optimizer.step()
    grad_activations = run.send("server", site, activations.grad)
    outputs.backward(grad_activations)  # client: backward from the cut, then one step for its layers and head
    client_optimizer.step()
    run.compute("client", flops[0] * len(labels))
    run.compute("server", flops[1] * len(labels))


def step_for(client_model):
    """`label_private_step` for a label-private client part (`common.LabelPrivateClient`), else `split_step`."""
    return label_private_step if is_label_private(client_model) else split_step


def turn_order(run, round):
    """The order in which clients take their turns in round `round` (0-based): site order (order="fixed"),
    or a permutation drawn from (seed, round), the same in every process (order="shuffled")."""
    num_sites = len(run.train_sets)
    if run.cfg["order"] == "fixed":
        return list(range(num_sites))
    seed = np.random.SeedSequence([run.cfg["seed"], round], spawn_key=(1,)).generate_state(1)[0]  # not a batch seed
    return torch.randperm(num_sites, generator=torch.Generator().manual_seed(int(seed))).tolist()


def take_turns(run, train_sets, round, turns):
    """(site, images, labels) in the order the clients train in one round: the sites in `turn_order`,
    each for its whole epoch (turns="client") or a mini-batch each, round and round (turns="batch")."""
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {', '.join(TURNS)}, not {turns!r}")
    streams = [(site, run.batches(train_sets[site], site, round)) for site in turn_order(run, round)]
    if turns == "client":
        for site, stream in streams:
            for images, labels in stream:
                yield site, images, labels
        return
    waiting = list(streams)
    while waiting:
        for site, stream in list(waiting):
            batch = next(stream, None)
            if batch is None:
                waiting.remove((site, stream))  # this client's data ran out: skip it until the round ends
            else:
                yield site, *batch


def train(client_model, server_model, train_sets, test_sets, turns="client", **cfg):
    """Split learning with alternate client (turns="client") or alternate mini-batch (turns="batch") training."""
    run = Run(f"sl-{turns}", train_sets, test_sets, parallel=False, **cfg)
    run.place(client_model, server_model)
    client_optimizer, server_optimizer = run.optimizer(client_model), run.optimizer(server_model)
    flops = split_flops(client_model, server_model, run.image_shape)
    step = step_for(client_model)
    every_site = [client_model] * len(train_sets), [server_model] * len(train_sets)  # one model, deployed everywhere
    for round in run.rounds(client_model, server_model, client_optimizer, server_optimizer):
        for site, images, labels in take_turns(run, train_sets, round, turns):
            if site != run.holder:  # hand the client part and its optimizer state to the next client
                run.send(run.holder, site, client_model.state_dict(), client_optimizer.state_dict()["state"])
                run.holder = site
            step(run, site, client_model, server_model, client_optimizer, server_optimizer, images, labels, flops)
        run.end_round(run.deploy(*every_site))  # as the last client left it; BatchNorm statistics each site's own
    return run.result(run.deploy(*every_site))  # the last round's (deploy is not done again)
