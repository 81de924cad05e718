"""On a CUDA GPU (`pytest -m cuda`; skipped without one): the same counts as on the CPU, the same numbers within
rounding, no host sync inside a round, the bench end to end, --deterministic bit for bit."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import data
import report
from test_all import FAST, SCHEMES, TINY, fresh_split


@pytest.fixture
def float32_on_cuda():
    """float32 on the GPU as on the CPU: no TF32 in convolutions or matrix products, deterministic kernels."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = saved


# At the bench's learning rate one round's loss is not a float32 quantity: Adam's first step moves every weight
# by lr times the sign of its gradient, and a gradient at the level of rounding takes either sign. On the CPU,
# channels-last against contiguous convolutions, or 1 thread against 2, moved one round's loss by up to 3.5% on
# these tiny federations at lr 1e-3 (the 2% this test once allowed failed for that reason). At lr 1e-7 the steps
# move the weights by less than rounding does, and the round is float32 arithmetic: CPU against CPU, 1.0e-6
# relative at most (all seven schemes); the CPU's float32 loss against float64, 1.6e-7 to 1.8e-6. With whole
# batches (a batch of 2 at 1x1 pixels makes BatchNorm divide by a variance near zero) the GPU is held to 1e-5.
ROUNDING = 1e-5


@pytest.fixture(scope="module")
def whole_batches():
    return data.synthetic_sites(num_sites=3, image_size=32, site_sizes=[42, 21, 21])  # 32, 15, 16 training images


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_on_cuda_every_scheme_counts_the_same_and_computes_like_cpu(scheme, whole_batches, float32_on_cuda):
    settings = dict(FAST, rounds=1, lr=1e-7)
    cpu = SCHEMES[scheme](*fresh_split(), *whole_batches, **settings)
    gpu = SCHEMES[scheme](*fresh_split(), *whole_batches, **dict(settings, device="cuda"))
    assert all(p.is_cuda for model in gpu["models"] for p in model.parameters())
    assert gpu["bytes"] == cpu["bytes"] and gpu["flops"] == cpu["flops"]
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=ROUNDING)
    for on_gpu, on_cpu in zip(gpu["models"], cpu["models"]):
        for key, value in on_cpu.named_parameters():  # the weights: a few steps of 1e-7 from the same start
            assert torch.allclose(on_gpu.get_parameter(key).cpu(), value, rtol=1e-5, atol=1e-6), key
        for key, value in on_cpu.named_buffers():  # each site's BatchNorm statistics of features about 1 in size,
            # over as few as 15 values: up to 2e-5 apart on an H200 (sfv2-batch), where rtol alone fails near 0
            assert torch.allclose(on_gpu.get_buffer(key).cpu().double(), value.double(), rtol=1e-3, atol=1e-4), key


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_on_cuda_training_never_waits_for_the_gpu(scheme, three_sites):
    """Any synchronising call (.item(), a copy to the host, a blocking copy) inside a round raises; the
    warm-up before the first round and the statistics pass and scoring at the end of each may synchronise."""
    class InsideRounds:
        def round_started(self, run):
            torch.cuda.set_sync_debug_mode("error")

        def round_ending(self, run):
            torch.cuda.set_sync_debug_mode(0)

    client_model, server_model = (part.cuda() for part in fresh_split())
    try:
        result = SCHEMES[scheme](client_model, server_model, *three_sites, hooks=[InsideRounds()],
                                 **dict(FAST, device="cuda", bf16=True))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert np.isfinite(result["loss"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_bench_measures_saves_and_plots_every_row(tmp_path, monkeypatch, capsys):
    plot = ["--plot", str(tmp_path / "gpu.png")] if importlib.util.find_spec("matplotlib") else []
    rows = bench.main(TINY + ["--device", "cuda", "--attack", "--attack-steps", "30", "--label-private", "--cuts-sweep",
                              "--bf16", "--save", str(tmp_path / "runs")] + plot)
    assert [row["scheme"] for row in rows] == list(bench.SCHEMES)
    assert not [row for row in rows if row.get("error") or row.get("failed")] and "error" not in capsys.readouterr().err
    assert all("attack" in row["privacy"] and "label_leak" in row["privacy"] for row in rows if row["scheme"] in bench.SPLIT_SCHEMES)
    for scheme in bench.SCHEMES:  # saved on the GPU, loaded as CPU tensors by a plain torch.load
        saved = torch.load(tmp_path / "runs" / scheme / "site-0.pt", weights_only=True)
        assert all(value.device.type == "cpu" for part in saved.values() for value in part.values()), scheme
    model = report.load_site_model(tmp_path / "runs" / "sfv3" / "site-1.pt")
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 1)
    defended = bench.main(TINY + ["--device", "cuda", "--schemes", "sl-client,sfv3", "--label-private", "--bf16",
                                  "--attack", "--attack-steps", "30", "--defense", "nopeek:1", "--defense", "noise:0.3",
                                  "--defense", "gradient-noise:0.3"])
    assert not [row for row in defended if row.get("error") or row.get("failed")]
    assert all({"dcor", "attack", "label_leak"} <= set(row["privacy"]) for row in defended)
    distributed = bench.main(TINY + ["--device", "cuda", "--distributed", "--bf16", "--save", str(tmp_path / "parties")])
    assert not [row for row in distributed if row.get("error") or row.get("failed")]
    assert all(row["wire_bytes"] == row["bytes"] for row in distributed)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_deterministic_runs_are_the_same_bit_for_bit(tmp_path):
    for run in ("a", "b"):  # separate processes: cuBLAS reads its workspace setting when it starts
        subprocess.run([sys.executable, "bench.py", *TINY, "--rounds", "2", "--device", "cuda", "--deterministic",
                        "--schemes", "central,sl-batch,sfv1", "--attack", "--json", str(tmp_path / f"{run}.json"),
                        "--save", str(tmp_path / run)], check=True, cwd=Path(bench.__file__).parent, capture_output=True)
    first, second = (json.loads((tmp_path / f"{run}.json").read_text()) for run in "ab")
    for a, b in zip(first, second):
        assert [e["loss"] for e in a["history"]] == [e["loss"] for e in b["history"]], a["scheme"]
        assert a["auroc"] == b["auroc"] and a["bytes"] == b["bytes"] and a["flops"] == b["flops"]
        assert a["privacy"] == b["privacy"], a["scheme"]  # dCor² and the attack too
        for site in range(2):
            saved = [torch.load(tmp_path / run / a["scheme"] / f"site-{site}.pt", weights_only=True) for run in "ab"]
            for part in ("client", "server"):
                assert all(torch.equal(value, saved[1][part][key]) for key, value in saved[0][part].items())
