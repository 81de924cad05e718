"""DenseNet-121 (torchvision) split into a client part and a server part at a named cut.

`split_model(model, cut)` cuts a torchvision DenseNet after a named child of `model.features`; the two
parts share the model's layers, and `server_model(client_model(x))` is `model(x)` bit for bit.
`split_densenet121` builds the model (grayscale, one logit, local weights) and splits it; `merge` joins two
trained parts again to cut them elsewhere. It imports no other module of the package: what a part costs is
counted in `common.py`, which knows nothing of DenseNet.
"""
import os
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

CUTS = ("conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "transition2",
        "denseblock3", "transition3", "denseblock4", "norm5")


class ServerModel(nn.Module):
    """The layers of `model.features` after the cut, then what `DenseNet.forward` does outside `features`."""

    def __init__(self, features, classifier):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, activations):
        out = self.features(activations)
        # Not in place: at cut "norm5" the input is the received activations, a leaf that requires grad.
        out = F.relu(out)
        if out.is_cuda and torch.are_deterministic_algorithms_enabled():
            return self.classifier(out.mean((2, 3)))  # the same average; adaptive pooling's CUDA backward is not deterministic
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


def split_model(model, cut):
    """Split a torchvision DenseNet after `model.features.<cut>` into (client_model, server_model).

    Both parts hold the model's own layers (no copy), so training either trains `model`.
    """
    if cut not in CUTS:
        raise ValueError(f"unknown cut {cut!r}; valid cuts: {', '.join(CUTS)}")
    children = list(model.features.named_children())
    at = [name for name, _ in children].index(cut) + 1
    server_layers = OrderedDict(children[at:])
    if cut == "norm0":
        # relu0 is in place and would overwrite the received activations; ReLU has no weights to share.
        server_layers["relu0"] = nn.ReLU()
    client_model = nn.Sequential(OrderedDict(children[:at]))
    server_model = ServerModel(nn.Sequential(server_layers), model.classifier)
    return client_model, server_model


def merge(client_model, server_model):
    """The whole DenseNet again, sharing the two parts' layers: `split_model(merge(client, server), cut)`
    cuts a trained model anywhere else."""
    with torch.device("meta"):
        model = torchvision.models.densenet121(num_classes=1)
    model.features = nn.Sequential(OrderedDict([*client_model.named_children(), *server_model.features.named_children()]))
    model.classifier = server_model.classifier
    return model


def _load_weights(weights):
    """A state dict from a local file, or from torchvision's named weights (these need the network)."""
    if os.path.exists(str(weights)):
        try:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot load weights file {weights}: {error}") from None
        if not isinstance(state_dict, dict):
            raise ValueError(f"weights file {weights} does not hold a state dict")
        return state_dict
    try:
        named = torchvision.models.get_weight(weights if "." in str(weights) else f"DenseNet121_Weights.{weights}")
    except Exception:
        raise ValueError(f"weights {weights!r} is neither a file nor a torchvision DenseNet-121 weight name "
                         f"(such as DenseNet121_Weights.IMAGENET1K_V1)") from None
    try:
        return named.get_state_dict(progress=False)
    except Exception as error:
        raise ValueError(f"cannot download weights {weights!r} ({type(error).__name__}); with no network, "
                         f"pass a local state-dict file instead") from None


def _fit_state_dict(state_dict, model, source):
    """Adapt a DenseNet-121 state dict to `model`: old key names, grayscale input, another head."""
    # torchvision's original checkpoints name layers 'norm.1' where the modules are now 'norm1'.
    old = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    state_dict = {old.sub(r"\1\2", key).removeprefix("module."): value for key, value in state_dict.items()}
    own = model.state_dict()
    conv0 = state_dict.get("features.conv0.weight")
    if conv0 is not None and conv0.shape[1] == 3 and own["features.conv0.weight"].shape[1] == 1:
        state_dict["features.conv0.weight"] = conv0.sum(dim=1, keepdim=True)  # a gray image is R = G = B
    for key in ("classifier.weight", "classifier.bias"):
        if key in state_dict and state_dict[key].shape != own[key].shape:
            state_dict[key] = own[key]  # another number of classes: keep the fresh head
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        reason = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise ValueError(f"weights {source} do not fit DenseNet-121: {reason[:300]}") from None


def split_densenet121(cut="transition1", num_classes=1, in_channels=1, weights=None):
    """Build torchvision's DenseNet-121 (`weights`: None, a local state-dict file or a torchvision name) and split it."""
    model = torchvision.models.densenet121(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if weights is not None:
        _fit_state_dict(_load_weights(weights), model, weights)
    return split_model(model, cut)


def activation_shape(cut, image_size, in_channels=1):
    """(C, H, W) of the activations sent at `cut` for square images of `image_size` pixels.

    Shape propagation on the meta device: no weights, no arithmetic.
    """
    with torch.device("meta"):
        client_model, _ = split_densenet121(cut, in_channels=in_channels)
        try:
            out = client_model(torch.empty(2, in_channels, image_size, image_size))
        except RuntimeError:
            out = None
    if out is None or min(out.shape[2:]) < 1:
        raise ValueError(f"image size {image_size} is too small for DenseNet-121 at cut {cut!r}")
    return tuple(out.shape[1:])
