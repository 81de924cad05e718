"""DenseNet-121 split into a client part and a server part, and the counters every scheme uses.

`split_model(model, cut)` cuts a torchvision DenseNet after a named child of `model.features`; the two
parts share the model's layers, and `server_model(client_model(x))` is `model(x)` bit for bit.
`nbytes` counts what a transfer weighs and `training_flops` what a training step costs, from torch's own
FLOP counter, so the schemes can count both explicitly at the line where they happen.
"""
import copy
import os
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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


def nbytes(obj):
    """Bytes of what travels: a tensor, several tensors, a state dict, an optimizer's state (nested)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(value) for value in obj)
    return 0


_flops_cache = {}


def training_flops(module, input_shape, input_grad=False):
    """FLOPs of one forward + backward pass per sample, for inputs of shape (C, H, W).

    Counted by `torch.utils.flop_counter.FlopCounterMode` on a weightless copy (meta device), once per
    architecture and shape. `input_grad`: the backward also computes the gradient of the input (a server
    part does, to send it back).
    """
    key = (str(module), tuple(input_shape), input_grad)
    if key not in _flops_cache:
        meta = copy.deepcopy(module).to("meta").eval()
        x = torch.empty(1, *input_shape, device="meta", requires_grad=input_grad)
        with FlopCounterMode(display=False) as counter:
            meta(x).sum().backward()
        _flops_cache[key] = counter.get_total_flops()
    return _flops_cache[key]


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


def split_flops(client_model, server_model, image_shape):
    """Training FLOPs per sample of (client part, server part) for images of shape (C, H, W)."""
    return (training_flops(client_model, image_shape),
            training_flops(server_model, output_shape(client_model, image_shape), input_grad=True))


def output_shape(module, input_shape):
    """Shape of one sample's output for inputs of shape `input_shape`, on a weightless (meta) copy."""
    with torch.no_grad():
        return tuple(copy.deepcopy(module).to("meta").eval()(torch.empty(2, *input_shape, device="meta")).shape[1:])


class _Zeros(torch.autograd.Function):
    """Zeros of a given shape forward, zero gradients for the input and every parameter backward."""

    @staticmethod
    def forward(ctx, x, output_shape, dtype, *parameters):
        ctx.input_shape, ctx.input_dtype, ctx.parameters = x.shape, x.dtype, parameters
        return x.new_zeros(len(x), *output_shape, dtype=dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = grad_output.new_zeros(ctx.input_shape, dtype=ctx.input_dtype) if ctx.needs_input_grad[0] else None
        return (grad_input, None, None, *(torch.zeros_like(p) for p in ctx.parameters))


class CostOnly(nn.Module):
    """Stands in for a model part when only costs are counted (`bench.py --costs-only`).

    It holds the real part, so state dicts and optimizer state weigh what they weigh in training, and its
    output has the real output's shape and dtype; but its output is zeros and its gradients are zeros, so a
    scheme's loop runs, and counts, exactly as in training without the arithmetic. On the meta device (where
    `training_flops` counts) it is the real part.
    """

    def __init__(self, part, input_shape):
        super().__init__()
        self.part = part
        self.output_shape = output_shape(part, input_shape)

    def forward(self, x):
        if x.device.type == "meta":
            return self.part(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        return _Zeros.apply(x, self.output_shape, dtype, *self.part.parameters())


def cost_only(client_model, server_model, image_shape):
    """(client, server) stand-ins that count like the real parts at no arithmetic cost."""
    client = CostOnly(client_model, image_shape)
    return client, CostOnly(server_model, client.output_shape)
