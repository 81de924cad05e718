"""What each party can learn (attacks.py, privacy.py) and the defenses (defenses.py), on trained runs."""
import json
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import attacks
import bench
import defenses
import densenet_split as ds
import fedlearn
import labelprivate
import privacy
import report
import splitfed
import splitlearn
from common import batch_bounds, shuffled
from defenses import Defense
from test_all import SHARED_XRAYS, real_xray_sites
from test_all import FAST, TINY, fresh_split


def test_the_attacks_upsampling_is_bilinear_interpolation():
    torch.manual_seed(0)
    for features, size in ((torch.randn(2, 3, 6, 6), 48), (torch.randn(2, 3, 1, 1), 32), (torch.randn(1, 2, 7, 5), 64)):
        expected = F.interpolate(features, size=(size, size), mode="bilinear", align_corners=False)
        assert torch.allclose(attacks.upsample(features, size), expected, atol=1e-6)


def test_leakage_shuffles_the_pairs_by_permuting_the_distance_matrix():
    torch.manual_seed(0)
    images, client_model = torch.rand(20, 1, 8, 8), nn.Conv2d(1, 2, 3)
    found = attacks.leakage(client_model, images, batch_size=8, seed=3)
    activations = attacks.sent_activations(client_model, images, 8)
    shuffled = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    assert found["dcor"] == pytest.approx(attacks.distance_correlation(images, activations), abs=1e-12)
    assert found["dcor_shuffled"] == pytest.approx(attacks.distance_correlation(images, activations[shuffled]), abs=1e-12)


def test_distance_correlation_is_zero_for_independent_data_and_one_for_a_distance_preserving_map():
    torch.manual_seed(0)
    x, z = torch.randn(256, 2000), torch.randn(256, 3000)
    assert abs(attacks.distance_correlation(x, z)) < 0.05
    permuted = 3 * x[:, torch.randperm(2000)]  # a scaled permutation of the features keeps every distance's ratio
    assert attacks.distance_correlation(x, permuted) == pytest.approx(1, abs=1e-9)


@pytest.fixture(scope="module")
def trained_split(three_site_results):
    return three_site_results["sl-client"]["models"][0]


def test_activations_carry_less_of_the_image_the_deeper_the_cut(trained_split, three_sites):
    cuts = {row["cut"]: row["dcor"] for row in attacks.cuts_sweep(*trained_split, three_sites[0], 16, log=None)}
    assert cuts["conv0"] > cuts["transition1"] > cuts["transition2"] > cuts["norm5"]


def test_reconstruction_attack_beats_its_floor_at_the_first_cut_and_reaches_it_at_the_last(trained_split, three_sites):
    model = ds.merge(*trained_split)
    train_sets = three_sites[0]
    found = {cut: attacks.reconstruction_attack(ds.split_model(model, cut)[0], train_sets[1].images,
                                                train_sets[0].images, 16, steps=150)
             for cut in ("conv0", "norm5")}
    assert found["conv0"]["ssim"] > found["conv0"]["ssim_floor"] + 0.05
    assert found["norm5"]["ssim"] < found["conv0"]["ssim"]
    assert found["norm5"]["ssim"] > found["norm5"]["ssim_floor"] - 0.02  # 1 x 1 activations: at least the mean image
    assert found["conv0"]["target_size"] == 32 and found["conv0"]["ssim_floor"] == found["norm5"]["ssim_floor"]


def test_label_private_sends_no_labels_and_its_gradients_still_tell_them(three_sites):
    train_sets, _ = three_sites
    result = splitfed.train(*labelprivate.label_private(*fresh_split()), *three_sites, version=3,
                            step=labelprivate.step, **FAST)
    num_images, activation = sum(len(s) for s in train_sets), int(np.prod(ds.activation_shape("transition1", 32)))
    features = 1024  # the pooled features the server sends, and their gradient that comes back
    for link in ("client->server", "server->client"):  # no label: activations and features, there and back
        assert result["bytes"][link] == FAST["rounds"] * num_images * (activation + features) * 4, link
    leaks = [attacks.label_leak(model[0], model[1], s.images, s.labels, 16) for model, s in zip(result["models"], train_sets)]
    for leak in leaks:
        assert 0 <= leak["norm_auroc"] <= 1 and leak["cosine_auroc"] == 1.0  # one logit: the direction is the label


def test_bench_shows_what_the_server_can_learn(capsys):
    rows = bench.main(TINY + ["--schemes", "central,fedavg,sl-client", "--label-private"])
    found = {row["scheme"]: row["privacy"] for row in rows}
    assert found["central"] == dict(sends="images", labels_leave=True)
    assert found["fedavg"] == dict(sends="weights", labels_leave=False)
    assert found["sl-client"]["labels_leave"] is False and len(found["sl-client"]["dcor"]) == 2
    assert all(abs(value) < 0.3 for value in found["sl-client"]["dcor_shuffled"])
    assert "label leak AUROC" in capsys.readouterr().out


def test_nopeeks_counted_flops_are_the_arithmetic_of_its_matrices():
    images, activations = torch.rand(16, 1, 32, 32), torch.rand(16, 128, 4, 4, requires_grad=True)
    with FlopCounterMode(display=False) as counter:  # counts the matrix products, forward and backward
        defenses.nopeek_penalty(images, activations).backward()
    elementwise = defenses.NOPEEK_ELEMENTWISE * 16 * 16
    assert defenses.nopeek_flops(16, 32 * 32, 128 * 4 * 4) == counter.get_total_flops() + elementwise
    # and the ledger counts it once per client batch, on the client
    plain, defended = (bench.main(TINY + ["--costs-only", "--schemes", "sl-client", "--rounds", "2"] + extra)[0]
                       for extra in ([], ["--defense", "nopeek:1"]))
    batches = [end - start for n in plain["num_examples"] for start, end in batch_bounds(n, 8)]
    activation = int(np.prod(ds.activation_shape("transition1", 32)))
    assert defended["flops"]["client"] - plain["flops"]["client"] == 2 * sum(
        defenses.nopeek_flops(n, 32 * 32, activation) for n in batches)
    assert defended["flops"]["server"] == plain["flops"]["server"] and defended["bytes"] == plain["bytes"]


class Received:
    """Records what the server receives for activations, and, through a forward hook on the client part, what
    the client computed for them in training (not the warm-up's, the statistics pass's or the scoring's)."""

    def __init__(self, client_model):
        self.computed, self.received, self.training = [], [], False
        client_model.register_forward_hook(self.note)

    def note(self, module, inputs, output):
        if self.training and torch.is_grad_enabled():
            self.computed.append(output.detach().clone())

    def round_started(self, run):
        self.training = True

    def round_ending(self, run):
        self.training = False

    def sent(self, run, source, destination, link, objects):
        if link == "client->server":
            self.received.append(objects[0].clone())
        return objects


def test_the_server_receives_the_activations_plus_seeded_noise_of_the_stated_scale(three_sites):
    computed, received = [], []
    runs = []
    for _ in range(2):
        client_model, server_model = fresh_split()
        recorder = Received(client_model)
        runs.append(splitlearn.train(client_model, server_model, *three_sites, hooks=[Defense(noise=0.5), recorder],
                                     **dict(FAST, rounds=1, batch_size=8)))
        computed += recorder.computed
        received += recorder.received
    noise = [sent - activations for sent, activations in zip(received, computed)]
    half = len(noise) // 2
    assert half == len(received) - half == sum(len(batch_bounds(len(s), 8)) for s in three_sites[0])  # each run
    for batch, activations in zip(noise[:half], computed):
        assert batch.mean().abs() < 0.02 * activations.std()
        assert batch.std() / activations.std() == pytest.approx(0.5, rel=0.05)
    assert all(torch.equal(a, b) for a, b in zip(noise[:half], noise[half:]))  # the same seed, the same noise
    drawn = [batch / batch.std() for batch in noise[:half]]  # the unit noise: every batch its own
    assert not any(a.shape == b.shape and torch.allclose(a, b, atol=1e-5) for i, a in enumerate(drawn) for b in drawn[i + 1:])
    assert runs[0]["loss"] == runs[1]["loss"] and torch.equal(
        runs[0]["models"][0][0].conv0.weight, runs[1]["models"][0][0].conv0.weight)


def test_every_defense_at_strength_zero_is_the_undefended_run_bit_for_bit(tmp_path):
    zero = ["--defense", "nopeek:0", "--defense", "noise:0", "--defense", "gradient-noise:0"]
    plain, defended = (bench.main(TINY + ["--schemes", "sl-client", "--label-private", "--save", str(tmp_path / name)]
                                  + extra)[0]
                       for name, extra in (("plain", []), ("zero", zero)))
    for key in ("loss", "auroc", "site_auroc", "bytes", "flops", "privacy"):
        assert plain[key] == defended[key], key
    saved = [torch.load(tmp_path / name / "sl-client" / "site-0.pt", weights_only=True) for name in ("plain", "zero")]
    assert all(torch.equal(value, saved[1]["client"][key]) for key, value in saved[0]["client"].items())


def test_nopeek_lowers_dcor_at_the_cut_as_alpha_grows(three_sites, three_site_results):
    train_sets = three_sites[0]
    found = []
    for alpha in (0, 1, 10):  # alpha 0: the undefended run of the fixture, the same settings
        result = three_site_results["sl-client"] if alpha == 0 else splitlearn.train(
            *fresh_split(), *three_sites, hooks=[Defense(nopeek=alpha)], **dict(FAST, rounds=1))
        client_model = result["models"][0][0]
        found.append(statistics.mean(attacks.leakage(client_model, s.images, 16)["dcor"] for s in train_sets))
    assert found[0] > found[1] > found[2], found


def test_each_privacy_measure_is_reported_from_its_worst_round():
    attack = lambda ssim: dict(ssim=ssim, ssim_floor=0.7, psnr=20.0, psnr_floor=19.0)
    leak = lambda cosine: [dict(norm_auroc=0.5, cosine_auroc=cosine)] * 2
    history = [dict(round=1, privacy=dict(dcor=[0.5, 0.7], dcor_shuffled=[0.01, 0.0], attack=attack(0.8),
                                          label_leak=leak(0.9))),
               dict(round=2, privacy=dict(dcor=[0.9, 0.1], dcor_shuffled=[0.02, 0.0], attack=attack(0.75),
                                          label_leak=leak(None))),
               dict(round=3, privacy=dict(dcor=[0.8, 0.6], dcor_shuffled=[0.03, 0.0], attack=attack(0.7),
                                          label_leak=leak(0.95)))]
    found = privacy.what_the_server_learns(history, "activations", labels_leave=False)
    assert found["dcor"] == [0.8, 0.6] and found["dcor_shuffled"] == [0.03, 0.0]  # mean 0.7 beats 0.6 and 0.5
    assert found["attack"]["ssim"] == 0.8 and found["label_leak"][0]["cosine_auroc"] == 0.95
    assert found["worst_round"] == dict(dcor=3, attack=1, label_leak=3)
    assert found["labels_leave"] is False and found["sends"] == "activations"


def test_tradeoff_trains_each_defense_at_each_strength_and_prints_the_curve(tmp_path, capsys):
    rows = bench.main(TINY + ["--tradeoff", "--defense", "nopeek:1", "--defense", "noise:0.5", "--rounds", "2",
                              "--json", str(tmp_path / "rows.json")])
    assert [(row["scheme"], row["defense"]) for row in rows] == [
        ("sl-client", "none"), ("sl-client", "nopeek:1"), ("sl-client", "noise:0.5")]
    none, nopeek, noise = rows
    assert nopeek["flops"]["client"] > none["flops"]["client"] < noise["flops"]["client"]
    assert none["bytes"] == nopeek["bytes"] == noise["bytes"]
    assert all(len(row["history"]) == 2 and all("dcor" in entry["privacy"] for entry in row["history"]) for row in rows)
    assert statistics.mean(noise["privacy"]["dcor"]) < statistics.mean(none["privacy"]["dcor"])
    out = capsys.readouterr().out
    assert "what each defense buys" in out and "nopeek:1" in out.split("what each defense buys")[1]
    assert report.epsilon_cell(noise) == "no ε (no clip)" == report.epsilon_cell(nopeek) and report.epsilon_cell(none) == "-"
    assert [row["defense"] for row in json.loads((tmp_path / "rows.json").read_text())] == ["none", "nopeek:1", "noise:0.5"]


@pytest.mark.extras
def test_tradeoff_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = bench.main(TINY + ["--tradeoff", "--defense", "noise:1", "--defense", "dp:0.5", "--seeds", "2", "--attack",
                              "--attack-steps", "5", "--site-sizes", "12,10", "--plot", str(tmp_path / "tradeoff.png")])
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {(row["scheme"], row["defense"]) for row in rows} == {
        ("sl-client", "none"), ("sl-client", "noise:1"), ("fedavg", "none"), ("fedavg", "dp:0.5+clip:50")}
    assert all(report.worst_gain(row) is not None for row in rows)  # every scheme on the one axis


# Client-level differential privacy (--defense dp:SIGMA --clip NORM --delta D)

def test_a_dp_update_is_its_start_plus_the_update_clipped_plus_seeded_noise_of_sigma_times_the_clip():
    torch.manual_seed(0)
    start = {"w": torch.randn(300), "b": torch.randn(20), "bn.num_batches_tracked": torch.tensor(7)}
    state = {"w": start["w"] + 3 * torch.randn(300), "b": start["b"] + torch.randn(20), "bn.num_batches_tracked": torch.tensor(9)}
    change = lambda uploaded: torch.cat([uploaded[key] - start[key] for key in ("w", "b")]).double()
    clipped, flops = Defense(dp=0, clip=2.0).update(state, start, key=(0, 1, 2, 0))
    assert change(clipped).norm() == pytest.approx(2.0, rel=1e-5) and flops == defenses.DP_FLOPS * 320
    assert torch.allclose(change(clipped), change(state) * 2 / change(state).norm(), atol=1e-5)  # the same direction
    assert clipped["bn.num_batches_tracked"] == 9  # a count travels as it is
    unclipped, _ = Defense(dp=0, clip=1e6).update(state, start, key=(0, 1, 2, 0))
    assert all(torch.equal(unclipped[key], state[key]) for key in state)  # under the clip: the state itself
    noisy, _ = Defense(dp=0.5, clip=2.0).update(state, start, key=(0, 1, 2, 0))
    noise = change(noisy) - change(clipped)
    assert noise.std() == pytest.approx(0.5 * 2.0, rel=0.15) and abs(noise.mean()) < 0.2
    again, _ = Defense(dp=0.5, clip=2.0).update(state, start, key=(0, 1, 2, 0))
    other, _ = Defense(dp=0.5, clip=2.0).update(state, start, key=(0, 2, 2, 0))
    assert torch.equal(again["w"], noisy["w"]) and not torch.equal(other["w"], noisy["w"])  # seeded by the key


class Uploads:
    """What the aggregator receives from each client, and what it sends back."""

    def __init__(self):
        self.received, self.sent_back = [], []

    def sent(self, run, source, destination, link, objects):
        if link == "client->aggregator":
            self.received.append((len(run.history), source, {k: v.clone() for k, v in objects[0].items()}))
        if link == "aggregator->client":
            self.sent_back.append((len(run.history), destination, {k: v.clone() for k, v in objects[0].items()}))
        return objects


def test_under_dp_the_aggregator_receives_updates_within_the_clip_and_epsilon_is_reported(three_sites):
    uploads = Uploads()
    start = dict(nn.Sequential(*fresh_split()).state_dict())
    result = fedlearn.train(nn.Sequential(*fresh_split()), *three_sites, hooks=[Defense(dp=0, clip=5.0), uploads],
                            **dict(FAST, rounds=2))
    for round, site, state in uploads.received:  # each round's start: the initial weights, then the average sent
        begun = start if round == 0 else next(s for r, d, s in uploads.sent_back if r == round - 1 and d == site)
        update = torch.sqrt(sum((state[k].double() - begun[k].double()).square().sum() for k in state
                                if state[k].is_floating_point()))
        assert update <= 5.0 * (1 + 1e-6), (round, site, float(update))
    plain = fedlearn.train(nn.Sequential(*fresh_split()), *three_sites, **dict(FAST, rounds=2))
    numbers = sum(v.numel() for v in start.values() if v.is_floating_point())
    assert result["flops"]["client"] - plain["flops"]["client"] == 2 * 3 * defenses.DP_FLOPS * numbers
    rows = bench.main(TINY + ["--schemes", "fedavg,sfv1", "--defense", "dp:1", "--clip", "3", "--delta", "1e-6"])
    assert [row["defense"] for row in rows] == ["dp:1+clip:3"] * 2
    assert all(row["epsilon"] == defenses.epsilon(1.0, 1, 1e-6) and row["delta"] == 1e-6 for row in rows)


def test_dp_zero_with_an_unbounded_clip_is_the_undefended_run_bit_for_bit(tmp_path):
    runs = {name: bench.main(TINY + ["--schemes", "fedavg,sfv2", "--rounds", "2", "--save", str(tmp_path / name)] + extra)
            for name, extra in (("plain", []), ("unbounded", ["--defense", "dp:0", "--clip", "inf"]),
                                ("far", ["--defense", "dp:0", "--clip", "1e30"]))}  # (the clipping path, never binding)
    for name in ("unbounded", "far"):
        for plain, zero in zip(runs["plain"], runs[name]):
            for key in ("loss", "auroc", "site_auroc", "bytes"):  # (the finite clip's work is counted in FLOPs)
                assert plain[key] == zero[key], (name, key)
            assert [e["loss"] for e in plain["history"]] == [e["loss"] for e in zero["history"]]
            folder = report.folder_name(zero)
            for site in range(2):
                saved = [torch.load(tmp_path / where / f / f"site-{site}.pt", weights_only=True)
                         for where, f in (("plain", report.folder_name(plain)), (name, folder))]
                assert all(torch.equal(v, saved[1]["client"][k]) for k, v in saved[0]["client"].items()), (name, site)


# What each party received (privacy.Recorder) and what it could learn from it, on one scale (privacy.measure)

class Sent:
    """Every tensor a client sent the server, as the run handed it over."""

    def __init__(self):
        self.activations = []

    def sent(self, run, source, destination, link, objects):
        if link == "client->server" and objects[0].dim() == 4:
            self.activations.append((len(run.history), source, objects[0].detach().clone()))
        return objects


class Forwards:
    """Images through a client part's forward passes (a hook on it)."""

    def __init__(self, model):
        self.images = 0
        model.register_forward_hook(lambda module, inputs, output: setattr(self, "images", self.images + len(inputs[0])))


def trained_watching(three_sites, watched):
    """sl-client for a round on the three sites, the server's view recorded and measured if `watched`: (the
    images through the client part's forward passes, the run's result, every batch sent, the recorder, what
    failed)."""
    client_model, server_model = fresh_split()
    forwards, sent, failed = Forwards(client_model), Sent(), {}
    recorder = privacy.Recorder(three_sites[0], 16, seed=0, keep=24)
    measures = privacy.Measures(recorder, 0, lambda what, function: bench.attempt(what, function, failed, print))
    hooks = [sent] + ([recorder, measures] if watched else [])
    result = splitlearn.train(client_model, server_model, *three_sites, turns="client", hooks=hooks,
                              **dict(FAST, rounds=1))
    return forwards.images, result, sent, recorder, failed


def test_the_measures_use_the_activations_the_server_received_and_run_no_forward_pass_of_their_own(three_sites):
    trained_watching(three_sites, False)  # (the first run in a process also warms the parts up)
    unwatched = trained_watching(three_sites, False)[0]
    images, result, sent, recorder, failed = trained_watching(three_sites, True)
    assert images == unwatched and not failed  # training, statistics and scoring: nothing encoded again
    for site in range(3):  # each kept batch is one the server received, whole, in the order it came, with the
        indices, kept = recorder.received(site)  # indices of the images behind it in the run's shuffled order
        assert len(indices) <= 24 and len(kept) == len(indices)
        batches = [tensor for _, source, tensor in sent.activations if source == site]
        order = shuffled(0, site, 0, len(three_sites[0][site]))
        bounds, start = batch_bounds(len(order), 16), 0
        for number, batch in enumerate(batches):
            if start < len(kept) and torch.equal(batch, kept[start:start + len(batch)]):
                assert torch.equal(indices[start:start + len(batch)], order[slice(*bounds[number])]), (site, number)
                start += len(batch)
        assert start == len(kept) > 0, site
    found = result["history"][0]["privacy"]
    expected = attacks.dependence(three_sites[0][0].images[recorder.received(0)[0]], recorder.received(0)[1], 0)
    assert found["dcor"][0] == expected["dcor"]


@pytest.fixture(scope="module")
def attacked(tiny_run):
    return {row["scheme"]: row for row in tiny_run[0]}


def lines_of(row, victim=0):
    return {(line["attacker"], line["channel"]): line for line in row["leak"] if line["victim"] == victim}


def test_every_scheme_names_each_attacker_on_one_scale(attacked, capsys):
    assert set(attacked) == set(bench.SCHEMES) and not any(row.get("failed") for row in attacked.values())
    central = lines_of(attacked["central"])
    assert central["server", "images"]["ssim"] >= 0.99 and attacked["central"]["leak_worst"]["channel"] == "images"
    assert central["server", "labels"]["label_auroc"] == 1.0
    fedavg = lines_of(attacked["fedavg"])
    assert set(fedavg) == {("aggregator", "weights")} and fedavg["aggregator", "weights"]["ssim"] is not None
    for scheme in bench.SPLIT_SCHEMES:
        lines = lines_of(attacked[scheme])
        server = lines["server", "activations"]
        assert server["ssim"] is not None and 0 < server["dcor"] <= 1, scheme
        assert server["gain"] == pytest.approx((server["ssim"] - server["ssim_floor"]) / (1 - server["ssim_floor"]))
        assert lines["server", "labels"]["label_auroc"] == 1.0
        assert (("server+aggregator", "activations") in lines) == (scheme in ("sfv1", "sfv2")), scheme
        assert (("client 1", "weights") in lines) == (("server+client 1", "activations") in lines) == scheme.startswith("sl-")
        for colluding in ("server+aggregator", "server+client 1"):  # it holds what the server holds, and more
            if (colluding, "activations") in lines:
                assert lines[colluding, "activations"]["ssim"] >= server["ssim"], scheme
                assert lines[colluding, "activations"]["method"] in ("decoder", "white-box decoder", "rMLE")
        assert server["ssim_reachable"] >= server["ssim_floor"]
        assert server.get("reach") is None or server["reach"] == pytest.approx(
            (server["ssim"] - server["ssim_floor"]) / (server["ssim_reachable"] - server["ssim_floor"]))
        other = lines_of(attacked[scheme], victim=1)  # the server's decoder with site 1 the victim, knowing site 2
        assert set(other) == {("server", "activations")} and other["server", "activations"]["ssim_floor"] != server["ssim_floor"]
        for line in (server, other["server", "activations"]):
            low, high = line["gain_interval"]
            assert 0 <= low <= line["gain"] <= high, scheme
        assert attacked[scheme]["leak_worst"] == max((line for line in attacked[scheme]["leak"] if line["gain"] is not None),
                                                     key=lambda line: line["gain"])
    # one scale: every attacker's floor is the same prior against the same victim images, and no leak is below it
    measured = [line for row in attacked.values() for line in row["leak"] if line["ssim"] is not None]
    site_0 = [line for line in measured if line["victim"] == 0]
    assert max(line["ssim_floor"] for line in site_0) == pytest.approx(min(line["ssim_floor"] for line in site_0))
    assert all(line["gain"] >= 0 and line["ssim"] >= line["ssim_floor"] for line in measured)
    assert lines_of(attacked["sl-client"])["client 1", "weights"]["method"] == "not attacked"
    assert lines_of(attacked["sl-client"])["client 1", "weights"]["ssim"] is None
    table = report.results_table(list(attacked.values()))
    assert "server 1.00 (" in table and "aggregator " in table
    assert "server+aggregator" in report.leak_table(list(attacked.values()))


def test_a_runs_leak_keeps_each_attackers_worst_round():
    line = lambda attacker, **found: privacy.entry(attacker, "activations", 0, **found)
    history = [dict(round=1, privacy=dict(leak=[line("server", ssim=0.8, ssim_floor=0.7), line("client 1", dcor=0.4)])),
               dict(round=2, privacy=dict(leak=[line("server", ssim=0.75, ssim_floor=0.5), line("client 1", dcor=0.6)])),
               dict(round=3, privacy=dict(leak=[line("server", ssim=0.9, ssim_floor=0.8)]))]
    lines, worst = privacy.worst_leaks(history)
    by = {line["attacker"]: line for line in lines}
    assert by["server"]["round"] == 2 and by["server"]["gain"] == pytest.approx(0.5)  # 0.25 / 0.5 beats 0.1 / 0.3
    assert by["client 1"]["round"] == 2 and by["client 1"]["dcor"] == 0.6
    assert worst == by["server"]


@pytest.mark.skipif(not SHARED_XRAYS.exists(), reason="the real X-rays (../shared/data) are not beside the project")
def test_the_split_servers_attack_recovers_real_xrays_at_the_first_cut(tmp_path):
    """The positive control of the server's attack, on the bench's own path: at `conv0` the activations are the image
    at half resolution, and real X-rays come back (gain at least 0.5; it is about 0.8)."""
    folder = real_xray_sites(tmp_path, [64, 64])
    rows = bench.main(["--data", str(folder), "--image-size", "32", "--cut", "conv0", "--rounds", "1", "--schemes", "sl-client",
                       "--attack", "--attack-steps", "150"])
    server = lines_of(rows[0])["server", "activations"]
    assert server["gain"] >= 0.5 and server["ssim_reachable"] >= server["ssim"] - 0.05
