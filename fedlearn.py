"""Centralized training (the baseline) and federated learning with FedAvg.

centralized: every site uploads its images once; one model trains on the pool at the server.
FedAvg: each round every client trains the global model for one local epoch on its own images and uploads its weights;
the aggregator averages them, weighted by number of examples, and sends the average back.
To reuse: copy this file with common.py.
"""
import torch

from common import Run, bce, tensors, training_flops


def fedavg(state_dicts, num_examples):
    """The average of `state_dicts` weighted by `num_examples`: weights and BatchNorm running statistics, summed in
    float64. Integer buffers (BatchNorm's `num_batches_tracked`) are averaged alike and rounded to a whole number:
    the count of batches the average model has, in effect, seen (it matters only to BatchNorm with momentum=None)."""
    if next(iter(state_dicts[0].values())).is_meta:  # held elsewhere (a meta tensor): the shapes, nothing to compute
        return dict(state_dicts[0])
    total, keys = sum(num_examples), list(state_dicts[0])
    mean = torch._foreach_mul([state_dicts[0][key].double() for key in keys], num_examples[0] / total)
    for n, state_dict in zip(num_examples[1:], state_dicts[1:]):  # (one call for all of a model's tensors)
        torch._foreach_add_(mean, [state_dict[key].double() for key in keys], alpha=n / total)
    first = state_dicts[0]
    return {key: value.to(first[key].dtype) if first[key].is_floating_point() else value.round().to(first[key].dtype)
            for key, value in zip(keys, mean)}


def average_models(run, client_models, num_examples):
    """FedAvg in place: each client uploads its copy's weights, the aggregator averages them and sends the average
    back, and each copy loads it (keeping its own optimizer's state)."""
    uploads = [run.send(site, "aggregator", model.state_dict()) for site, model in enumerate(client_models)]
    uploads, num_examples = run.screened(uploads, num_examples)  # all of them, unless a hook refuses one
    average = fedavg(uploads, num_examples)
    run.compute("aggregator", 2 * len(uploads) * sum(t.numel() for t in average.values()))  # a multiply, an add
    for site, model in enumerate(client_models):
        model.load_state_dict(run.send("aggregator", site, average))


def local_epoch(run, model, optimizer, dataset, site, round, party, flops_per_sample):
    """One pass of `party` over `dataset`: forward, loss, backward, step, for every mini-batch."""
    for images, labels in run.batches(dataset, site, round):
        with run.autocast():
            loss = bce(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.note_loss(loss, len(labels))
        run.compute(party, flops_per_sample * len(labels))


def centralized(model, train_sets, test_sets, **cfg):
    """The baseline: the sites' images pooled at the server, one model, one optimizer."""
    run = Run("central", train_sets, test_sets, **cfg)
    run.place(model)
    optimizer = run.optimizer(model)
    flops_per_sample = training_flops(model, run.image_shape)
    uploads = [run.send(site, "server", *tensors(train_set)) for site, train_set in enumerate(train_sets)]
    images, labels = zip(*uploads)  # the raw images and their labels, uploaded once
    pool = torch.cat(images), torch.cat(labels)
    at_the_server = [model] * len(test_sets)  # every site's images go to the one model
    for round in run.rounds(model, optimizer):
        local_epoch(run, model, optimizer, pool, 0, round, "server", flops_per_sample)
        run.deploy_and_score(server_sides=at_the_server)  # with BatchNorm statistics of each site's own
    return run.result(server_sides=at_the_server)


def train(model, train_sets, test_sets, **cfg):
    """FedAvg: one local epoch per client per round, then a weighted average of the clients' weights."""
    run = Run("fedavg", train_sets, test_sets, **cfg)
    run.place(model)
    client_models = run.copies(model, range(len(train_sets)))  # the same initial weights at every client
    optimizers = [run.optimizer(m) for m in client_models]  # each client's own Adam, kept across rounds
    num_examples = [len(s) for s in train_sets]
    flops_per_sample = training_flops(model, run.image_shape)
    for round in run.rounds(*client_models, *optimizers):
        for site, (client_model, optimizer, dataset) in enumerate(zip(client_models, optimizers, train_sets)):
            local_epoch(run, client_model, optimizer, dataset, site, round, "client", flops_per_sample)
        average_models(run, client_models, num_examples)
        run.deploy_and_score(client_models)  # each site its copy, with BatchNorm statistics of its own
    return run.result(client_models)
