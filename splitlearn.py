"""Split learning: the client part of the network stays with the clients, the server part at the server.

One client part and one server part. Clients take turns: with turns="client" each trains one whole local epoch,
then hands the client part (and its optimizer state) to the next; with turns="batch" they hand it on after every
mini-batch, and a client whose data ran out is skipped until the round ends. The clients take their turns in site
order every round (order="fixed", as the paper did) or in a seeded order drawn anew each round (order="shuffled"),
so that no site always trains last.
To reuse: copy this file with common.py.
"""
import torch

from common import Run, bce, output_shape, seeded, training_flops

TURNS = ("client", "batch")


def split_step(run, site, client_model, server_model, client_optimizer, server_optimizer, images, labels, flops):
    """One training step of client `site` across the cut; `flops` = (client, server) training FLOPs per sample."""
    with run.autocast():
        outputs = client_model(images)  # client: forward to the cut
    outputs = run.defended(site, images, outputs)  # (unless a defense hook changes what the client sends)
    # What leaves the client: the activations without their graph, and the labels; never the images.
    activations, labels = run.send(site, "server", outputs.detach(), labels)
    activations.requires_grad_()
    with run.autocast():
        loss = bce(server_model(activations), labels)  # server: the rest of the network and the loss
    server_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    server_optimizer.step()
    run.note_loss(loss, len(labels))
    grad_activations = run.send("server", site, activations.grad)
    client_optimizer.zero_grad(set_to_none=True)
    outputs.backward(grad_activations)  # client: backward from the cut, then its own step
    client_optimizer.step()
    run.compute("client", flops[0] * len(labels))
    run.compute("server", flops[1] * len(labels))


def split_flops(client_model, server_model, image_shape):
    """Training FLOPs per sample of (client part, server part) for images of shape (C, H, W); a client part with a
    `head` counts it too."""
    activation_shape = output_shape(client_model, image_shape)
    client, server = (training_flops(client_model, image_shape),
                      training_flops(server_model, activation_shape, input_grad=True))
    if hasattr(client_model, "head"):
        client += training_flops(client_model.head, output_shape(server_model, activation_shape), input_grad=True)
    return client, server


def turn_order(run, round):
    """The order in which clients take their turns in round `round` (0-based): site order (order="fixed"), or a
    permutation drawn from (seed, round), the same in every process (order="shuffled")."""
    num_sites = len(run.train_sets)
    if run.cfg["order"] == "fixed":
        return list(range(num_sites))
    return torch.randperm(num_sites, generator=seeded(run.cfg["seed"], round, stream=1)).tolist()


def take_turns(run, train_sets, round, turns):
    """(site, images, labels) in the order the clients train in one round: the sites in `turn_order`, each for its
    whole epoch (turns="client") or a mini-batch each, round and round (turns="batch")."""
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


def train(client_model, server_model, train_sets, test_sets, turns="client", step=split_step, **cfg):
    """Split learning with alternate client (turns="client") or alternate mini-batch (turns="batch") training; `step`:
    one training step across the cut (`split_step`, or another split's, such as the U-shaped one of labelprivate.py)."""
    run = Run(f"sl-{turns}", train_sets, test_sets, **cfg)
    run.place(client_model, server_model)
    client_optimizer, server_optimizer = run.optimizer(client_model), run.optimizer(server_model)
    flops = split_flops(client_model, server_model, run.image_shape)
    every_site = [client_model] * len(train_sets), [server_model] * len(train_sets)  # one model, deployed everywhere
    for round in run.rounds(client_model, server_model, client_optimizer, server_optimizer):
        for site, images, labels in take_turns(run, train_sets, round, turns):
            if site != run.holder:  # hand the client part and its optimizer state to the next client
                run.send(run.holder, site, client_model.state_dict(), client_optimizer.state_dict()["state"])
                run.holder = site
            step(run, site, client_model, server_model, client_optimizer, server_optimizer, images, labels, flops)
        run.deploy_and_score(*every_site)  # as the last client left it; BatchNorm statistics each site's own
    return run.result(*every_site)
