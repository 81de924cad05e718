"""Each scheme file copies cleanly: exactly the files its docstring names, in an empty folder, train every scheme
of that file for a round on a small model that is not DenseNet, with no other module of this package and no
torchvision importable."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_layout import companions

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE = sorted(path.stem for path in REPOSITORY.glob("*.py") if path.stem not in ("setup", "conftest")
                 and not path.stem.startswith("test"))

# What each file's schemes are, called on (client part, server part, train sets, test sets) of the small model.
SCHEMES = {
    "fedlearn.py": {"central": "fedlearn.centralized(nn.Sequential(client, server), *sites, **cfg)",
                    "fedavg": "fedlearn.train(nn.Sequential(client, server), *sites, **cfg)"},
    "splitlearn.py": {"sl-client": "splitlearn.train(client, server, *sites, turns='client', **cfg)",
                      "sl-batch": "splitlearn.train(client, server, *sites, turns='batch', **cfg)"},
    "splitfed.py": {f"sfv{version}": f"splitfed.train(client, server, *sites, version={version}, **cfg)"
                    for version in (1, 2, 3)},
}

SCRIPT = '''
import importlib.abc, sys

class Elsewhere(importlib.abc.MetaPathFinder):
    """The package's modules that were not copied, and torchvision: not importable here."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not among the copied files")

sys.meta_path.insert(0, Elsewhere())
import math, os
import torch
from torch import nn
from torch.utils.data import TensorDataset
{imports}

torch.manual_seed(0)
def site(num_images):
    labels = torch.arange(num_images) % 2
    images = torch.rand(num_images, 3, 16, 16) + 0.5 * labels[:, None, None, None]
    return TensorDataset(images, labels.float())
sites = [site(24), site(16)], [site(8), site(8)]  # two sites: train sets, test sets
cfg = dict(rounds=1, batch_size=8, log=None, device="cpu")
for name, train in {schemes}.items():
    torch.manual_seed(0)
    client = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    server = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(8, 1))
    result = eval(train)
    assert math.isfinite(result["loss"]) and result["auroc"] is not None, name
    assert sum(result["bytes"].values()) > 0 and result["flops"]["client"] + result["flops"]["server"] > 0, name
    assert len(result["models"]) == 2 and result["models"][0](torch.rand(2, 3, 16, 16)).shape == (2, 1), name
    print(name, "loss", round(result["loss"], 4), "auroc", round(result["auroc"], 3))
here = os.path.realpath(os.getcwd())
loaded = [module.__file__ for name, module in sys.modules.items() if name in {package!r}]
assert all(os.path.realpath(path).startswith(here) for path in loaded), loaded
print("imported:", sorted(os.path.basename(path) for path in loaded))
'''


@pytest.mark.parametrize("scheme_file", SCHEMES)
def test_a_scheme_file_with_exactly_its_named_companions_trains_a_small_model_for_every_scheme(scheme_file, tmp_path):
    files = [scheme_file, *companions(scheme_file)]
    for name in files:
        shutil.copy(REPOSITORY / name, tmp_path / name)
    copied = {Path(name).stem for name in files}
    imports = "\n".join(f"import {stem}" for stem in sorted(copied))
    script = SCRIPT.format(blocked=sorted(set(PACKAGE) - copied) + ["torchvision"], imports=imports,
                           schemes="{" + ", ".join(f"{name!r}: {call!r}" for name, call in SCHEMES[scheme_file].items())
                           + "}", package=PACKAGE)
    (tmp_path / "check.py").write_text(script)
    done = subprocess.run([sys.executable, "check.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(f"{name} loss" in done.stdout for name in SCHEMES[scheme_file]), done.stdout
    assert f"imported: {sorted(f'{stem}.py' for stem in copied)}" in done.stdout, done.stdout
