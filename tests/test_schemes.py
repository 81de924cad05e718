"""The schemes' runs beyond the reference tier: settings that must not change what trains, client order,
bf16, the optimizer's state, a cost-only run's work."""
import time

import numpy as np
import pytest
import torch
import torch.optim.optimizer as optimizer_hooks

import data
import densenet_split as ds
import splitfed
import splitlearn
from common import Run
from profiler import WarmUp
from standins import CostsOnly, adam_state, cost_only
from test_all import FAST, SCHEMES, fresh_split


def test_bn_setting_never_changes_the_trained_weights(three_sites):
    runs = {bn: splitfed.train(*fresh_split(), *three_sites, version=2, **dict(FAST, bn=bn, rounds=1))
            for bn in ("local", "averaged")}
    for local, averaged in zip(runs["local"]["models"], runs["averaged"]["models"]):
        for (name, a), b in zip(local.named_parameters(), averaged.parameters()):
            assert torch.equal(a, b), name
        buffers = [not torch.equal(a, b) for a, b in zip(local.buffers(), averaged.buffers())]
        assert any(buffers)  # only the deployed BatchNorm statistics differ
    assert [e["loss"] for e in runs["local"]["history"]] == [e["loss"] for e in runs["averaged"]["history"]]


def test_nan_loss_stops_the_scheme_with_a_reason(one_site):
    train_sets, test_sets = one_site
    broken = data.Site(torch.full_like(train_sets[0].images, float("nan")), train_sets[0].labels, "nan")
    with pytest.raises(FloatingPointError, match="loss is nan in round 1"):
        splitlearn.train(*fresh_split(), [broken], test_sets, **FAST)


def test_bf16_autocast_sends_bf16_activations_and_still_learns(one_site):
    result = splitlearn.train(*fresh_split(), *one_site, **dict(FAST, rounds=1, bf16=True))
    num_images, activation = len(one_site[0][0]), int(np.prod(ds.activation_shape("transition1", 32)))
    assert result["bytes"]["server->client"] == num_images * activation * 2  # 2 bytes per bf16 value
    assert result["bytes"]["client->server"] == num_images * (activation * 2 + 4)  # labels stay float32
    assert np.isfinite(result["loss"]) and result["auroc"] is not None


def test_set_up_is_not_in_the_wall_time_and_warm_up_changes_nothing(one_site, monkeypatch):
    parts = fresh_split()
    WarmUp()(parts, one_site[0], FAST["batch_size"], "cpu")  # as the bench does before a run: copies take the steps
    quick = splitfed.train(*parts, *one_site, version=1, **dict(FAST, rounds=1))
    hours, count = [0.0], splitfed.split_flops
    clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + 3600 * hours[0])  # the run's clock, and a jump

    def slow_set_up(*args):
        hours[0] += 1  # an hour of set-up after the run began, whatever the machine's load
        return count(*args)
    monkeypatch.setattr(splitfed, "split_flops", slow_set_up)
    slow = splitfed.train(*fresh_split(), *one_site, version=1, **dict(FAST, rounds=1))
    assert hours[0] == 1 and slow["seconds"] < 3600  # the hour of set-up is not timed
    for a, b in zip(quick["models"][0].state_dict().values(), slow["models"][0].state_dict().values()):
        assert torch.equal(a, b)  # with and without the warm-up: the same weights and statistics, bit for bit


def test_costs_only_does_no_optimizer_arithmetic_and_makes_no_gradients(three_sites):
    train_sets, test_sets = three_sites
    meta_sets = [[data.Site(s.images.to("meta"), s.labels, s.name) for s in sets] for sets in three_sites]
    client_model, server_model = cost_only(*fresh_split(), train_sets[0].images.shape[1:])
    optimizers = {}  # every optimizer that steps, through torch's global hook
    hook = optimizer_hooks.register_optimizer_step_pre_hook(lambda optimizer, *_: optimizers.update({id(optimizer): optimizer}))
    try:
        result = splitlearn.train(client_model, server_model, *meta_sets, turns="batch", **dict(FAST, hooks=[CostsOnly()]))
    finally:
        hook.remove()
    optimizers = list(optimizers.values())
    weights = [p for model in result["models"] for p in model.parameters()]
    assert all(p.is_meta and p.grad is None for p in weights)  # nothing computed, no gradient tensor made
    state = [t for optimizer in optimizers for s in optimizer.state.values() for t in s.values()]
    assert len(optimizers) == 2 and state and all(t.is_meta for t in state)  # moments and steps: shapes only
    assert result["bytes"]["client->client"] > 0


def test_adam_state_made_up_front_is_the_state_adam_makes_and_trains_the_same(one_site):
    run = Run("adam", *one_site, **FAST)
    eager_model, lazy_model = fresh_split()[0], fresh_split()[0]
    eager = run.optimizer(eager_model)
    adam_state(eager)  # made up front, as the hooks that need it make it (a transport, a checkpoint, a cost-only run)
    lazy = torch.optim.Adam(lazy_model.parameters(), lr=run.lr, fused=True)
    for step in range(3):
        for model, optimizer in ((eager_model, eager), (lazy_model, lazy)):
            torch.manual_seed(step)
            model(torch.rand(4, 1, 32, 32)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(eager_model.state_dict().values(), lazy_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(eager.state_dict()["state"].values(), lazy.state_dict()["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_shuffled_turns_draw_a_seeded_order_per_round_and_parallel_clients_cannot_tell(three_sites):
    def turn_orders(seed, order="shuffled"):
        run = Run("turns", *three_sites, order=order, seed=seed)
        return [splitlearn.turn_order(run, round) for round in range(8)]

    assert turn_orders(0, "fixed") == [[0, 1, 2]] * 8
    orders = turn_orders(0)
    assert orders == turn_orders(0) and orders != turn_orders(1)  # seeded
    assert all(sorted(order) == [0, 1, 2] for order in orders) and len({tuple(o) for o in orders}) > 1
    runs = {(name, order): SCHEMES[name](*fresh_split(), *three_sites, **dict(FAST, rounds=1, order=order, seed=1))
            for name in ("sl-client", "sfv1", "sfv2") for order in ("fixed", "shuffled")}
    holder, handoffs = 0, 0  # by hand: the client part moves whenever the next turn is another site's
    for site in turn_orders(1)[0]:  # seed 1 draws 2, 1, 0 in round 1
        handoffs, holder = handoffs + (site != holder), site
    assert runs["sl-client", "shuffled"]["messages"]["client->client"] == handoffs == 3
    assert runs["sl-client", "fixed"]["messages"]["client->client"] == 2
    changed = lambda name: not all(torch.equal(a, b) for a, b in zip(
        runs[name, "fixed"]["models"][0].state_dict().values(), runs[name, "shuffled"]["models"][0].state_dict().values()))
    # v1's clients each have their own server copy; v2's share one, which the order of their turns changes.
    assert changed("sl-client") and not changed("sfv1") and changed("sfv2")
