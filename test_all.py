"""The reference tier: fast tests against reference answers (torchvision for the split, centralized training for
every scheme with one site, hand-computed averages, scikit-learn, shape arithmetic, torch's own FLOP counter) and
the numbers docs/course.md quotes. `python -m pytest test_all.py`; the longer tests are in tests/."""
import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import attacks
import bench
import common
import data
import defenses
import densenet_split as ds
import fedlearn
import inversion
import labelprivate
import report
import robust
import splitfed
import splitlearn
from common import Run, auroc, auroc_interval, batchnorm_statistics
from robust import Screen
from standins import CostsOnly, cost_only

torch.set_num_threads(2)


FAST = dict(rounds=2, batch_size=16, log=None, device="cpu")


def torchvision_densenet(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.densenet121(num_classes=1)


def fresh_split(cut="transition1", seed=0):
    torch.manual_seed(seed)
    return ds.split_densenet121(cut)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_split_composes_to_torchvision_bit_for_bit_at_every_cut(mode):
    model = torchvision_densenet()
    x = torch.randn(2, 3, 32, 32)
    for cut in ds.CUTS:
        getattr(model, mode)()
        expected = model(x)
        client_model, server_model = ds.split_model(model, cut)
        assert torch.equal(server_model(client_model(x)), expected), cut


def test_split_parts_share_the_models_parameters_none_lost():
    model = torchvision_densenet()
    everything = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    for cut in ds.CUTS:
        client_model, server_model = ds.split_model(model, cut)
        client = {id(t) for t in [*client_model.parameters(), *client_model.buffers()]}
        server = {id(t) for t in [*server_model.parameters(), *server_model.buffers()]}
        assert not client & server and client | server == everything, cut


def test_split_training_step_gives_the_whole_models_gradients_at_every_cut():
    model = torchvision_densenet()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0.0, 1.0])
    F.binary_cross_entropy_with_logits(model(x).squeeze(1), labels).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    for cut in ds.CUTS:
        model.zero_grad()
        client_model, server_model = ds.split_model(model, cut)
        outputs = client_model(x)
        activations = outputs.detach().requires_grad_()  # a leaf: an in-place op on it would fail here
        F.binary_cross_entropy_with_logits(server_model(activations).squeeze(1), labels).backward()
        outputs.backward(activations.grad)
        for name, p in model.named_parameters():
            assert torch.allclose(p.grad, expected[name], rtol=1e-4, atol=1e-6), (cut, name)


def test_unknown_cut_lists_the_valid_ones():
    with pytest.raises(ValueError, match="transition1"):
        ds.split_model(torchvision_densenet(), "layer4")


def test_grayscale_first_convolution_is_the_sum_of_rgb_filters(tmp_path):
    rgb = torchvision_densenet()
    rgb.classifier = nn.Linear(1024, 1000)  # an ImageNet-shaped head, which a one-logit model must replace
    path = tmp_path / "densenet121.pt"
    torch.save(rgb.state_dict(), path)
    client_model, server_model = ds.split_densenet121("transition1", weights=str(path))
    assert client_model.conv0.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(client_model.conv0.weight, rgb.features.conv0.weight.sum(1, keepdim=True))
    assert torch.equal(server_model.features.denseblock4.denselayer1.conv1.weight,
                       rgb.features.denseblock4.denselayer1.conv1.weight)
    assert server_model.classifier.weight.shape == (1, 1024)


def test_weights_that_do_not_fit_or_cannot_be_downloaded_are_clear_errors(tmp_path, monkeypatch):
    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="resnet.pt do not fit DenseNet-121"):
        ds.split_densenet121(weights=str(path))

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match="local state-dict file"):
        ds.split_densenet121(weights="IMAGENET1K_V1")


def test_training_flops_split_adds_up_to_the_whole_model():
    torch.manual_seed(0)
    for cut in ("conv0", "transition1", "norm5"):  # the first, the default and the last
        client_model, server_model = ds.split_densenet121(cut)
        whole = common.training_flops(nn.Sequential(client_model, server_model), (1, 64, 64))
        assert sum(splitlearn.split_flops(client_model, server_model, (1, 64, 64))) == whole, cut


def test_densenet121_forward_at_224_is_5_67_gflop():
    client_model, server_model = ds.split_densenet121(in_channels=3, num_classes=1000)
    model = nn.Sequential(client_model, server_model).to("meta").eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    assert counter.get_total_flops() == pytest.approx(5.67e9, rel=0.01)
    training = common.training_flops(nn.Sequential(client_model, server_model), (3, 224, 224))
    assert 2 * counter.get_total_flops() < training < 3 * counter.get_total_flops()


def test_activation_shapes_at_224_and_too_small_images():
    assert ds.activation_shape("transition1", 224) == (128, 28, 28)
    assert ds.activation_shape("pool0", 224) == (64, 56, 56)
    assert ds.activation_shape("norm5", 224) == (1024, 7, 7)
    with pytest.raises(ValueError, match="too small"):
        ds.activation_shape("norm5", 16)


def test_nbytes_of_tensors_state_dicts_and_optimizer_state():
    layer = nn.Linear(3, 2)  # 6 + 2 float32 numbers
    assert common.nbytes(layer.weight) == 24
    assert common.nbytes([layer.weight, layer.bias.half()]) == 24 + 4
    assert common.nbytes(layer.state_dict()) == 32
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert common.nbytes(optimizer.state_dict()["state"]) == 2 * 32 + 2 * 4  # exp_avg, exp_avg_sq, a step each


SCHEMES = {
    "fedavg": lambda c, s, tr, te, **cfg: fedlearn.train(nn.Sequential(c, s), tr, te, **cfg),
    "sl-client": lambda *a, **cfg: splitlearn.train(*a, turns="client", **cfg),
    "sl-batch": lambda *a, **cfg: splitlearn.train(*a, turns="batch", **cfg),
    "sfv1": lambda *a, **cfg: splitfed.train(*a, version=1, **cfg),
    "sfv2": lambda *a, **cfg: splitfed.train(*a, version=2, **cfg),
    "sfv2-batch": lambda *a, **cfg: splitfed.train(*a, version=2, turns="batch", **cfg),
    "sfv3": lambda *a, **cfg: splitfed.train(*a, version=3, **cfg),
}


@pytest.fixture(scope="module")
def one_site():
    return data.synthetic_sites(num_sites=1, image_size=32, site_sizes=[40])


@pytest.fixture(scope="module")
def three_sites():
    return data.synthetic_sites(num_sites=3, image_size=32, site_sizes=[40, 24, 16])


@pytest.fixture(scope="module")
def centralized_one_site(one_site):
    return fedlearn.centralized(nn.Sequential(*fresh_split()), *one_site, **FAST)


@pytest.fixture(scope="module")
def centralized_one_site_averaged(one_site):
    return fedlearn.centralized(nn.Sequential(*fresh_split()), *one_site, **dict(FAST, bn="averaged"))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bn", ["local", "averaged"])
def test_with_one_site_every_scheme_is_centralized_training(scheme, bn, one_site, centralized_one_site,
                                                            centralized_one_site_averaged):
    result = SCHEMES[scheme](*fresh_split(), *one_site, **dict(FAST, bn=bn))
    centralized_one_site = centralized_one_site if bn == "local" else centralized_one_site_averaged
    expected = centralized_one_site["models"][0].state_dict()
    got = result["models"][0].state_dict()
    for key, value in expected.items():
        assert torch.allclose(got[key].double(), value.double(), rtol=1e-5, atol=1e-6), key
    assert result["auroc"] == pytest.approx(centralized_one_site["auroc"], abs=1e-6)
    assert result["flops"]["client"] + result["flops"]["server"] == centralized_one_site["flops"]["server"]


@pytest.fixture(scope="module")
def three_site_results(three_sites):
    return {name: run(*fresh_split(), *three_sites, **dict(FAST, rounds=1)) for name, run in SCHEMES.items()}


def same_weights(models):
    """The same trained weights (each site's deployed BatchNorm statistics are its own under bn="local")."""
    first = dict(models[0].named_parameters())
    return all(all(torch.equal(p, first[k]) for k, p in m.named_parameters()) for m in models[1:])


def test_three_sites_who_deploys_what(three_site_results):
    for name in ("fedavg", "sl-client", "sl-batch", "sfv1", "sfv2"):
        models = three_site_results[name]["models"]
        assert same_weights(models) and len({id(model) for model in models}) == 3, name  # three copies, not one
    assert not same_weights(three_site_results["sfv3"]["models"])
    # FedAvg and SplitFed v1 compute the same model: the same weights and statistics at every site, bit for bit.
    for fedavg, sfv1 in zip(three_site_results["fedavg"]["models"], three_site_results["sfv1"]["models"]):
        assert all(torch.equal(a, b) for a, b in zip(fedavg.state_dict().values(), sfv1.state_dict().values()))
    assert three_site_results["fedavg"]["auroc"] == three_site_results["sfv1"]["auroc"]
    sl = {name: three_site_results[name]["bytes"]["client->client"] for name in ("sl-client", "sl-batch")}
    assert sl["sl-batch"] > sl["sl-client"] > 0


def test_bytes_equal_the_shape_arithmetic(three_sites, three_site_results):
    train_sets, _ = three_sites
    num_images, num_sites, rounds = sum(len(s) for s in train_sets), len(train_sets), 1
    activation = int(np.prod(ds.activation_shape("transition1", 32)))
    client_model, server_model = fresh_split()
    client_bytes = sum(t.numel() * 4 for t in client_model.state_dict().values() if t.is_floating_point())
    client_bytes += 8 * sum(not t.is_floating_point() for t in client_model.state_dict().values())  # int64 counters
    params = list(client_model.parameters())
    adam_bytes = 2 * sum(p.numel() * 4 for p in params) + 4 * len(params)  # two moments and a step per tensor
    whole = nn.Sequential(client_model, server_model).state_dict()
    whole_bytes = common.nbytes(whole)
    for name in ("sl-client", "sl-batch", "sfv1", "sfv2", "sfv3"):
        sent = three_site_results[name]["bytes"]
        assert sent["client->server"] == rounds * num_images * (activation * 4 + 4), name
        assert sent["server->client"] == rounds * num_images * activation * 4, name
    assert three_site_results["sl-client"]["bytes"]["client->client"] == (rounds * num_sites - 1) * (client_bytes + adam_bytes)
    for name in ("sfv1", "sfv2"):
        assert three_site_results[name]["bytes"]["client->aggregator"] == rounds * num_sites * client_bytes
        assert three_site_results[name]["bytes"]["aggregator->client"] == rounds * num_sites * client_bytes
    assert three_site_results["sfv3"]["bytes"]["client->aggregator"] == 0
    fedavg = three_site_results["fedavg"]
    assert fedavg["bytes"]["client->aggregator"] == fedavg["bytes"]["aggregator->client"] == rounds * num_sites * whole_bytes
    assert fedavg["bytes"]["client->server"] == fedavg["bytes"]["server->client"] == 0
    assert fedavg["flops"]["aggregator"] == rounds * 2 * num_sites * sum(t.numel() for t in whole.values())


def test_flop_totals_equal_centralized_training(three_sites, three_site_results):
    central = fedlearn.centralized(nn.Sequential(*fresh_split()), *three_sites, **dict(FAST, rounds=1))
    for name, result in three_site_results.items():
        assert result["flops"]["client"] + result["flops"]["server"] == central["flops"]["server"], name  # one round each
    train_sets, _ = three_sites
    assert central["bytes"]["client->server"] == sum(s.images.numel() * 4 + len(s) * 4 for s in train_sets)


def test_local_batchnorm_statistics_are_exact_at_every_site(three_sites, three_site_results):
    train_sets, _ = three_sites
    for name in ("fedavg", "sl-batch", "sfv3"):
        result = three_site_results[name]
        for site, (deployed, train_set) in enumerate(zip(result["models"], train_sets)):
            client_part = deployed[0]
            with torch.no_grad():
                conv0_output = client_part.conv0(train_set.images).double()
            assert torch.allclose(client_part.norm0.running_mean.double(), conv0_output.mean((0, 2, 3)), atol=1e-6)
            assert torch.allclose(client_part.norm0.running_var.double(),
                                  conv0_output.transpose(0, 1).flatten(1).var(1), rtol=1e-5)
            # A deeper layer, on the server side of the cut: what it sees in a train-mode pass over the site's
            # training images in the statistics pass's batches (at least 128 images: train mode normalises
            # with each batch's own statistics, so the deployed weights alone decide it), collected by a hook.
            seen = []
            model = copy.deepcopy(deployed).train()
            deep = dict(model.named_modules())["1.features.denseblock3.denselayer5.norm1"]
            deep.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].double()))
            with torch.no_grad():
                size = max(FAST["batch_size"], 128)
                for start in range(0, len(train_set), size):
                    model(train_set.images[start:start + size])
            seen = torch.cat(seen).transpose(0, 1).flatten(1)
            local = dict(deployed.named_modules())["1.features.denseblock3.denselayer5.norm1"]
            assert torch.allclose(local.running_mean.double(), seen.mean(1), atol=1e-5), (name, site)
            assert torch.allclose(local.running_var.double(), seen.var(1), rtol=1e-4, atol=1e-6), (name, site)


def test_recompute_batchnorm_equals_one_pass_with_momentum_none_on_one_batch():
    torch.manual_seed(0)
    model, images = nn.Sequential(*fresh_split()), torch.rand(12, 1, 32, 32)
    reference = copy.deepcopy(model)
    for layer in reference.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None
    with torch.no_grad():
        reference.train()(images)
    with batchnorm_statistics(model), torch.no_grad():
        model(images)
    for (key, got), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        if "running" in key:
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), key


def test_auroc_interval_contains_the_estimate_and_narrows_with_more_test_images():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    scores = labels + rng.normal(0, 1.2, 60)
    low, high = auroc_interval(scores, labels)
    assert low < auroc(scores, labels) < high and 0 <= low and high <= 1
    low2, high2 = auroc_interval(np.tile(scores, 4), np.tile(labels, 4))
    assert low2 < auroc(scores, labels) < high2
    assert (high2 - low2) < 0.7 * (high - low)  # four times the images: about half the width
    assert auroc_interval([0.1, 0.2], [1, 1]) is None
    assert auroc_interval(scores, labels) == (low, high)  # seeded


def test_fedavg_is_the_hand_computed_weighted_mean():
    first = {"w": torch.tensor([1.0, 2.0]), "bn.running_mean": torch.tensor([0.0, 4.0]),
             "bn.num_batches_tracked": torch.tensor(3)}
    second = {"w": torch.tensor([3.0, 6.0]), "bn.running_mean": torch.tensor([2.0, 0.0]),
              "bn.num_batches_tracked": torch.tensor(6)}
    average = fedlearn.fedavg([first, second], num_examples=[1, 3])
    assert torch.equal(average["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(average["bn.running_mean"], torch.tensor([1.5, 1.0]))
    assert average["bn.num_batches_tracked"].item() == 5 and average["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(first["w"], torch.tensor([1.0, 2.0]))  # pure: the inputs are untouched


def test_an_upload_not_finite_or_far_from_the_rounds_median_is_refused_as_computed_by_hand():
    upload = lambda *w: {"w": torch.tensor(w), "bn.num_batches_tracked": torch.tensor(7)}
    # the coordinate-wise median of the four: (0.5, 0.5); distances 0.707, 0.707, 0.707 and 49.3: 69.7x their median
    four = [upload(0.0, 0.0), upload(1.0, 0.0), upload(0.0, 1.0), upload(30.0, 40.0)]
    assert robust.refused_uploads(four, 10) == [None, None, None, "69.7x the median distance from the round's "
                                                "median update (limit 10)"]
    assert robust.refused_uploads(four, 70) == [None] * 4 and robust.refused_uploads(four, math.inf) == [None] * 4
    four[1] = upload(0.0, math.nan)  # left out first; then the median of the rest is (0, 1), the distances 1, 0, 49.2
    assert robust.refused_uploads(four, 10)[1] == "not finite" and robust.refused_uploads(four, 10)[3].startswith("49.2x")
    # two uploads: each as far from their median as the other; only what is not finite shows
    assert robust.refused_uploads([upload(0.0, 0.0), upload(1e4, 1e4)], 10) == [None, None]
    assert robust.refused_uploads([upload(0.0, math.inf), upload(1.0, 1.0)], 10) == ["not finite", None]
    assert not robust.not_finite([torch.tensor([3e38, 3e38]), torch.tensor([1, 2])])  # a sum that overflows: finite
    assert robust.not_finite([torch.ones(3), torch.tensor([1.0, -math.inf], dtype=torch.bfloat16)])
    for count in range(1, 21):  # the median by its network (up to 16) and by a sort, against numpy's
        values = torch.randn(count, 5, 3, dtype=torch.float64)
        assert torch.allclose(robust.coordinate_median(list(values)), torch.from_numpy(np.median(values.numpy(), axis=0)))


def test_fedavg_leaves_a_refused_upload_out_and_renormalises_the_others(three_sites):
    models = [nn.Linear(2, 1) for _ in range(3)]
    with torch.no_grad():
        for value, model in zip((1.0, math.nan, 4.0), models):
            model.weight.fill_(value)
            model.bias.fill_(value)
    lines, screen = [], Screen()
    run = Run("fedavg", *three_sites, hooks=[screen], log=lines.append)
    fedlearn.average_models(run, models, [1, 5, 2])
    assert all(torch.equal(model.weight, torch.full((1, 2), 3.0)) for model in models)  # (1 x 1 + 4 x 2) / 3
    assert screen.refused == [dict(round=1, site=1, reason="not finite")]
    assert lines == ["fedavg: client 1's update refused: not finite (round 1)"]
    with torch.no_grad():
        for model in models:
            model.weight.fill_(math.nan)
    with pytest.raises(ValueError, match="round 1: every update refused"):
        fedlearn.average_models(run, models, [1, 5, 2])


def test_auroc_with_ties_matches_hand_and_scikit_learn():
    assert auroc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == 0.875  # (1 + 0.5 + 2) / 4 pairs
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 200) / 4, rng.integers(0, 2, 200)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert auroc([0.2, 0.3], [1, 1]) is None


def test_single_class_test_site_reports_auroc_not_defined(three_sites):
    train_sets, test_sets = three_sites
    negatives = test_sets[2].labels == 0
    only_negatives = data.Site(test_sets[2].images[negatives], test_sets[2].labels[negatives], "negatives")
    result = fedlearn.train(nn.Sequential(*fresh_split()), train_sets, [*test_sets[:2], only_negatives],
                            **dict(FAST, rounds=1))
    assert result["site_auroc"][2] is None and result["site_auroc"][0] is not None


def test_same_seed_same_models_bytes_and_flops(three_sites, three_site_results):
    runs = [three_site_results["sfv1"], splitfed.train(*fresh_split(), *three_sites, version=1, **dict(FAST, rounds=1))]
    assert runs[0]["bytes"] == runs[1]["bytes"] and runs[0]["flops"] == runs[1]["flops"]
    assert runs[0]["history"][0]["auroc"] == runs[1]["history"][0]["auroc"]
    for a, b in zip(runs[0]["models"], runs[1]["models"]):
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_scoring_and_batchnorm_statistics_put_the_images_where_the_model_is(three_sites):
    """A model kept in float64 while the images stay float32: the mismatch a model trained on a GPU meets with
    images on the CPU, mended by the same line (`common.to_model`). CI has no GPU; this is its guard."""
    run = Run("central", *three_sites, **FAST)
    model = nn.Sequential(*fresh_split()).double()
    run.deploy_and_score(server_sides=[model] * 3)  # the statistics pass, then each site scored
    assert len(run.history[0]["site_auroc"]) == 3 and 0 <= run.history[0]["auroc"] <= 1
    assert run.deployed[0][0].norm0.running_mean.dtype == torch.float64


TINY = ["--site-sizes", "16,12", "--image-size", "32", "--rounds", "1", "--batch-size", "8"]
SHARED_XRAYS = Path(__file__).resolve().parent.parent / "shared" / "data" / "pneumoniamnist-dev.npz"  # (may be absent)


def real_xray_sites(folder, sizes, seed=0):
    """A federation of real X-rays from SHARED_XRAYS: one MedMNIST file per site in `folder`, `sizes` images each,
    drawn without replacement (seeded) from its training split."""
    found = np.load(SHARED_XRAYS)
    order = np.random.default_rng(seed).permutation(len(found["train_images"]))
    for site, end in enumerate(np.cumsum(sizes)):
        rows = order[end - sizes[site]:end]
        np.savez(Path(folder) / f"site-{site}.npz", train_images=found["train_images"][rows],
                 train_labels=found["train_labels"][rows])
    return folder


def test_costs_only_at_three_sites_predicts_exactly_what_training_counts(three_sites, three_site_results):
    meta_sets = [[data.Site(s.images.to("meta"), s.labels, s.name) for s in sets] for sets in three_sites]
    for name, trained in three_site_results.items():
        parts = cost_only(*fresh_split(), three_sites[0][0].images.shape[1:])
        predicted = SCHEMES[name](*parts, *meta_sets, **dict(FAST, rounds=1, hooks=[CostsOnly()]))
        for key in ("bytes", "messages", "flops"):
            assert predicted[key] == trained[key], (name, key)


def distance_correlation_by_the_book(x, z):
    """Székely and Rizzo (2014), U-centring and the U-statistic inner product, written out with loops."""
    n = len(x)
    x, z = x.reshape(n, -1).double(), z.reshape(n, -1).double()

    def u_centred(samples):
        a = [[float((samples[i] - samples[j]).norm()) for j in range(n)] for i in range(n)]
        row = [sum(a[i]) for i in range(n)]
        total = sum(row)
        return [[0.0 if i == j else a[i][j] - row[i] / (n - 2) - row[j] / (n - 2) + total / ((n - 1) * (n - 2))
                 for j in range(n)] for i in range(n)]

    def inner(a, b):
        return sum(a[i][j] * b[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 3))

    a, b = u_centred(x), u_centred(z)
    return inner(a, b) / (inner(a, a) * inner(b, b)) ** 0.5


def test_distance_correlation_is_the_published_formula():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 4)
    z = torch.cat([x.flatten(1)[:, :5] ** 2, torch.randn(12, 2)], 1)
    assert attacks.distance_correlation(x, z) == pytest.approx(distance_correlation_by_the_book(x, z), abs=1e-6)
    assert attacks.distance_correlation(x, z, chunk_size=5) == pytest.approx(attacks.distance_correlation(x, z), abs=1e-12)


def test_ssim_and_psnr():
    torch.manual_seed(0)
    image = torch.rand(2, 1, 32, 32)
    assert torch.allclose(attacks.ssim(image, image), torch.ones(2))
    noisy = [(image + sigma * torch.randn_like(image)).clamp(0, 1) for sigma in (0.05, 0.2)]
    assert (attacks.ssim(noisy[0], image) > attacks.ssim(noisy[1], image)).all()
    assert torch.allclose(attacks.psnr(image, image * 0 + image + 0.1), torch.full((2,), 20.0), atol=1e-4)


LABEL_PRIVATE = {name: run for name, run in SCHEMES.items() if name != "fedavg"}


@pytest.mark.parametrize("scheme", LABEL_PRIVATE)
def test_label_private_with_one_site_is_centralized_training(scheme, one_site, centralized_one_site):
    parts = labelprivate.label_private(*fresh_split())
    result = LABEL_PRIVATE[scheme](*parts, *one_site, step=labelprivate.step, **FAST)
    got = result["models"][0].state_dict()
    for key, value in centralized_one_site["models"][0].state_dict().items():
        key = key.replace("1.classifier.", "0.head.")  # the head moved to the client
        assert torch.allclose(got[key].double(), value.double(), rtol=1e-5, atol=1e-6), key
    assert result["auroc"] == pytest.approx(centralized_one_site["auroc"], abs=1e-6)
    assert result["flops"]["client"] + result["flops"]["server"] == centralized_one_site["flops"]["server"]


def test_nopeeks_penalty_and_its_gradient_match_the_formula_written_out():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 4, 4, generator=generator, dtype=torch.float64)
    activations = images.flatten(1)[:, :6] * 2 + 0.3 * torch.randn(8, 6, generator=generator, dtype=torch.float64)
    activations.requires_grad_()
    penalty = defenses.nopeek_penalty(images, activations)
    assert penalty.item() == pytest.approx(distance_correlation_by_the_book(images, activations.detach()), rel=1e-10)
    (grad_penalty,) = torch.autograd.grad(penalty, activations)
    for index in [(0, 0), (3, 2), (7, 5)]:  # central differences of the formula
        shifted = [activations.detach().clone() for _ in range(2)]
        shifted[0][index] += 1e-6
        shifted[1][index] -= 1e-6
        numeric = (distance_correlation_by_the_book(images, shifted[0])
                   - distance_correlation_by_the_book(images, shifted[1])) / 2e-6
        assert grad_penalty[index].item() == pytest.approx(numeric, rel=1e-5)
    # the client's backward pass: the server's gradient plus alpha times the penalty's
    sent, flops = defenses.Defense(nopeek=0.5).activations(images, activations, key=(0, 0, 0, 0))
    grad_from_server = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    sent.backward(grad_from_server)
    assert torch.allclose(activations.grad, grad_from_server + 0.5 * grad_penalty, rtol=1e-12, atol=0)
    assert torch.equal(sent, activations) and flops == defenses.nopeek_flops(8, 16, 6)


# The numbers docs/course.md quotes

COURSE = ["--site-sizes", "128,64", "--rounds", "3"]  # the lessons' federation


def test_the_course_quotes_what_the_code_computes(capsys):
    """Every number in bold in docs/course.md is one of these, computed here, and each of these is quoted: a
    lesson's arithmetic cannot drift from the code. Bytes and FLOPs of a cost-only run equal training's
    (`test_costs_only_at_three_sites_predicts_exactly_what_training_counts`)."""
    rows = {row["scheme"]: row for row in bench.main(COURSE + ["--costs-only"])}
    label_private, nopeek, noise = (bench.main(COURSE + ["--costs-only", "--schemes", "sl-client", *extra])[0]
                                    for extra in (["--label-private"], ["--defense", "nopeek:1"], ["--defense", "noise:1"]))
    capsys.readouterr()
    client_model, server_model = fresh_split()
    whole = nn.Sequential(client_model, server_model)
    activation, at_224 = ds.activation_shape("transition1", 48), ds.activation_shape("transition1", 224)
    sl, handoff = rows["sl-client"], rows["sl-client"]["bytes"]["client->client"] // rows["sl-client"]["messages"]["client->client"]
    assert rows["sl-batch"]["bytes"]["client->client"] == rows["sl-batch"]["messages"]["client->client"] * handoff
    number, human = "{:,}".format, report.human
    quoted = {
        number(common.nbytes(whole.state_dict())) + " bytes", human(rows["fedavg"]["bytes"]["client->aggregator"], "B"),
        number(common.nbytes(client_model.state_dict())) + " bytes", human(rows["sfv1"]["bytes"]["client->aggregator"], "B"),
        human(rows["fedavg"]["flops"]["aggregator"], "M").replace("MM", "M"),
        " × ".join(map(str, activation)), number(4 * int(np.prod(activation))) + " bytes", "4 bytes",
        number(sl["bytes"]["client->server"]) + " bytes", number(sl["bytes"]["server->client"]) + " bytes",
        str(sl["messages"]["client->server"]), " × ".join(map(str, at_224)), human(4 * int(np.prod(at_224)), "B"),
        number(handoff) + " bytes", str(sl["messages"]["client->client"]), human(sl["bytes"]["client->client"], "B"),
        str(rows["sl-batch"]["messages"]["client->client"]), human(rows["sl-batch"]["bytes"]["client->client"], "B"),
        human(rows["sfv3"]["bytes"]["client->aggregator"], "B"),
        *(human(rows[name]["flops"]["aggregator"]) for name in ("sfv1", "sfv2", "sfv3")),
        str(sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in whole.modules())),
        number(defenses.nopeek_flops(32, 48 * 48, int(np.prod(activation)))),
        human(nopeek["flops"]["client"] - sl["flops"]["client"]), human(sl["flops"]["client"]), str(defenses.NOISE_FLOPS),
        human(noise["flops"]["client"] - sl["flops"]["client"]), human(label_private["bytes"]["client->server"], "B"),
        human(sl["bytes"]["client->server"], "B")}
    assert rows["fedavg"]["flops"]["aggregator"] == rows["sfv1"]["flops"]["aggregator"]  # lesson 1: "both count"
    spans = re.findall(r"\*\*(.+?)\*\*", (Path(ds.__file__).parent / "docs" / "course.md").read_text(), flags=re.S)
    bold = {" ".join(span.split()) for span in spans if re.search(r"\d", span)}  # (a number may wrap across lines)
    assert bold == quoted, (sorted(bold - quoted), sorted(quoted - bold))


# An attack against its published setting

def dlg_lenet():
    """The DLG paper's LeNet (Zhu et al. 2019): three 5x5 convolutions of 12 channels with sigmoid activations,
    weights uniform in [-0.5, 0.5]; here for one grayscale 32x32 image and one logit."""
    net = nn.Sequential(nn.Conv2d(1, 12, 5, padding=2, stride=2), nn.Sigmoid(), nn.Conv2d(12, 12, 5, padding=2, stride=2),
                        nn.Sigmoid(), nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(768, 1))
    for weight in net.parameters():
        nn.init.uniform_(weight, -0.5, 0.5)
    return net


def test_gradient_inversion_reconstructs_one_image_in_the_dlg_setting():
    torch.manual_seed(0)
    net = dlg_lenet()
    train_sets, _ = data.synthetic_sites(num_sites=1, image_size=32, site_sizes=[16])
    image, label = train_sets[0].images[:1], train_sets[0].labels[:1]
    loss = F.binary_cross_entropy_with_logits(net(image).squeeze(1), label)
    gradients = torch.autograd.grad(loss, list(net.parameters()))
    before = copy.deepcopy(net.state_dict())
    reconstructed = inversion.invert_gradient(net, gradients, label, (1, 32, 32))
    assert reconstructed.shape == (1, 1, 32, 32) and 0 <= reconstructed.min() and reconstructed.max() <= 1
    assert float(attacks.ssim(reconstructed, image)) >= 0.9
    other = inversion.invert_gradient(net, gradients, 1 - label, (1, 32, 32), steps=200)  # the wrong label
    assert float(attacks.ssim(other, image)) < float(attacks.ssim(reconstructed, image))
    assert all(torch.equal(value, before[key]) for key, value in net.state_dict().items())  # the model untouched


def test_fedavg_inversion_recovers_the_dlg_image_from_an_sgd_update():
    """The positive control of the aggregator's attack: the function the bench runs (`invert_update`), on an update
    (one step of plain SGD on one image, FedSGD's setting) instead of a gradient, recovers the DLG image."""
    torch.manual_seed(0)
    net = dlg_lenet()
    train_sets, _ = data.synthetic_sites(num_sites=2, image_size=32, site_sizes=[16, 16])
    image, label = train_sets[0].images[:1], train_sets[0].labels[:1]
    start = copy.deepcopy(net.state_dict())
    client = copy.deepcopy(net)
    step = torch.optim.SGD(client.parameters(), lr=0.1)
    F.binary_cross_entropy_with_logits(client(image).squeeze(1), label).backward()
    step.step()
    found = inversion.invert_update(net, start, client.state_dict(), image, label, train_sets[1].images, batch_size=32,
                                  lr=0.1, optimizer="sgd", steps=2000)
    assert found["local_steps"] == 1 and found["num_images"] == 1
    assert found["ssim_reconstructed"] >= 0.9 and found["ssim"] == found["ssim_reconstructed"] > found["ssim_floor"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_attackers_replay_of_local_training_is_torchs_optimizer(optimizer):
    """`simulated_update`, which the aggregator fits images through, equals the client's own training by torch's
    SGD or Adam: three steps over two batches (cycled), BatchNorm in train mode."""
    torch.manual_seed(0)
    # (no bias before BatchNorm, as in DenseNet: its gradient is rounding noise, which Adam scales up to a step)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 1))
    images, labels = torch.rand(10, 1, 8, 8), (torch.arange(10) % 2).float()
    client = copy.deepcopy(model)
    step = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(client.parameters(), lr=0.01)
    for begin, end in [(0, 6), (6, 10), (0, 6)]:
        step.zero_grad()
        F.binary_cross_entropy_with_logits(client(images[begin:end]).squeeze(1), labels[begin:end]).backward()
        step.step()
    training = dict(optimizer=optimizer, lr=0.01, steps=3, batch_size=6)
    start = copy.deepcopy(model.state_dict())
    moments = inversion.recording_moments(model)
    replayed = inversion.simulated_update(model, list(model.parameters()), images, labels, training)
    for before, after, change in zip(model.parameters(), client.parameters(), replayed):
        assert torch.allclose(change, before - after, atol=1e-7, rtol=1e-4)
    # the BatchNorm prior: the replay's batches add up to what torch's running statistics gained, and others do not
    statistics = inversion.statistics_change(start, client.state_dict(), model)
    assert len(statistics) == 1 and float(inversion.statistics_error(moments, statistics)) < 1e-10
    moments.clear()
    inversion.simulated_update(model, list(model.parameters()), images * 0.5, labels, training)
    assert float(inversion.statistics_error(moments, statistics)) > 1e-3


def test_the_attackers_scale_never_goes_below_the_prior_and_assigns_one_to_one():
    optimize = pytest.importorskip("scipy.optimize")  # (scikit-learn's dependency)
    generator = torch.Generator().manual_seed(0)
    for rows, columns in ((1, 1), (3, 7), (8, 8), (12, 40)):
        gains = torch.rand(rows, columns, generator=generator)
        best = optimize.linear_sum_assignment(gains.numpy(), maximize=True)[1]
        matched = attacks.assignment(gains)
        assert len(set(matched)) == rows and float(gains[range(rows), matched].sum()) == pytest.approx(float(gains[range(rows), best].sum()))
    victims, known = (data.synthetic_sites(num_sites=2, image_size=32, site_sizes=[24, 24])[0][site].images for site in (0, 1))
    noise = attacks.compared(torch.rand(len(victims), 1, 32, 32, generator=generator), victims, known)
    assert noise["ssim"] >= noise["ssim_floor"] > noise["ssim_reconstructed"]  # the attacker keeps its prior
    perfect = attacks.compared(victims, victims, known)
    assert perfect["ssim"] == pytest.approx(1) and perfect["better"] == len(victims)
    # three exact copies, shuffled, of unknown victims: each finds its own image, the others keep the prior
    some = attacks.compared(victims[[5, 0, 17]], victims, known, paired=False)
    prior = attacks.ssim(known.mean(0, keepdim=True).expand_as(victims), victims)
    expected = (3 + float(prior.sum() - prior[[0, 5, 17]].sum())) / len(victims)
    assert some["better"] == 3 and some["ssim"] == pytest.approx(expected, abs=1e-6)
    # the gain's interval: scipy's percentile bootstrap of the same statistic (another resampling: agreeing to its
    # noise), within [0, 1] even for a perfect copy
    half = victims.clone()
    half[::2] = known.mean(0)
    found = attacks.compared(half, victims, known)
    best = torch.maximum(attacks.ssim(half, victims), prior).double().numpy()
    gain = lambda best, prior, axis=-1: (best.mean(axis) - prior.mean(axis)) / (1 - prior.mean(axis))
    reference = pytest.importorskip("scipy.stats").bootstrap((best, prior.double().numpy()), gain, paired=True,
                                                               method="percentile", random_state=0)
    assert found["gain_interval"] == pytest.approx(list(reference.confidence_interval), abs=0.01)
    assert found["gain_interval"][0] < gain(best, prior.double().numpy()) < found["gain_interval"][1]
    assert perfect["gain_interval"] == pytest.approx([1, 1]) and noise["gain_interval"][0] >= 0


def test_epsilon_of_client_level_dp_is_opacus_rdp_accountants():
    """The Gaussian mechanism at sample rate 1, composed over the rounds, as Opacus's RDP accountant computes it."""
    accountants = pytest.importorskip("opacus.accountants")
    for sigma, rounds, delta in [(1.0, 5, 1e-5), (0.5, 20, 1e-5), (2.0, 100, 1e-6), (10.0, 3, 1e-3), (0.01, 5, 1e-5)]:
        accountant = accountants.RDPAccountant()
        accountant.history = [(sigma, 1.0, rounds)]  # (noise multiplier, sample rate, steps)
        assert defenses.epsilon(sigma, rounds, delta) == pytest.approx(accountant.get_epsilon(delta), rel=0.01)
    assert defenses.epsilon(0, 5, 1e-5) is None  # no noise: no guarantee
