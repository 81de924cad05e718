"""DenseNet-121 split into a client part and a server part, and the counters every scheme uses.

`split_model(model, cut)` cuts a torchvision DenseNet after a named child of `model.features`; the two
parts share the model's layers, and `server_model(client_model(x))` is `model(x)` bit for bit.
`nbytes` counts what a transfer weighs and `training_flops` what a training step costs, from torch's own
FLOP counter, so the schemes can count both explicitly at the line where they happen.
"""
import copy
import json
import os
import re
from collections import OrderedDict
from pathlib import Path

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


class LabelPrivateClient(nn.Sequential):
    """The client part of a label-private (U-shaped) split: the layers up to the cut, run by `forward`, and
    the classifier `head`, which the client runs on the pooled features the server sends back."""

    def forward(self, images):
        for name, layer in self.named_children():
            if name != "head":
                images = layer(images)
        return images

    @property
    def body(self):
        """The layers up to the cut, without the head, as one module (sharing them)."""
        return nn.Sequential(OrderedDict((name, layer) for name, layer in self.named_children() if name != "head"))


class LabelPrivateModel(nn.Sequential):
    """A deployed label-private model, (client part, server part): images to logits."""

    def forward(self, images):
        client_model, server_model = self
        return client_model.head(server_model(client_model(images)))


def label_private(client_model, server_model):
    """(client, server) parts of a label-private (U-shaped) split, sharing the given parts' layers: the
    classifier head moves to the client, so the server's part ends with the pooled features and the labels
    and the loss never leave the client."""
    client = LabelPrivateClient(OrderedDict([*client_model.named_children(), ("head", server_model.classifier)]))
    return client, ServerModel(server_model.features, nn.Identity())


def is_label_private(client_model):
    return isinstance(client_model, LabelPrivateClient)


def joined(client_model, server_model):
    """The model a site deploys from its client part and a server part: images to logits."""
    return (LabelPrivateModel if is_label_private(client_model) else nn.Sequential)(client_model, server_model)


def merge(client_model, server_model):
    """The whole DenseNet again, sharing the two parts' layers: `split_model(merge(client, server), cut)`
    cuts a trained model anywhere else."""
    if is_label_private(client_model):
        client_model, server_model = client_model.body, ServerModel(server_model.features, client_model.head)
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


def load_site_model(path):
    """A site's deployed model saved by `bench.py --save` (site-K.pt, with model.json beside it), ready to
    score: an eval-mode module from images (N x C x size x size, values in [0, 1]) to logits, with the
    saved settings as `model.info` (cut, image_size, bn, scheme, ...)."""
    path = Path(path)
    info = json.loads((path.parent / "model.json").read_text())
    client_model, server_model = split_densenet121(info["cut"], num_classes=info["num_classes"],
                                                   in_channels=info["in_channels"])
    if info.get("label_private"):
        client_model, server_model = label_private(client_model, server_model)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    client_model.load_state_dict(saved["client"])
    server_model.load_state_dict(saved["server"])
    model = joined(client_model, server_model).eval()
    model.info = info
    return model


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

    Counted by `torch.utils.flop_counter.FlopCounterMode` on a weightless copy (meta device, stand-ins
    replaced by what they stand in for), once per architecture and shape. `input_grad`: the backward also computes the gradient of the input (a server
    part does, to send it back).
    """
    key = (str(module), tuple(input_shape), input_grad)
    if key not in _flops_cache:
        meta = unwrap(copy.deepcopy(module).to("meta")).eval()
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
    """Training FLOPs per sample of (client part, server part) for images of shape (C, H, W); a label-private
    client part counts its head too."""
    activation_shape = output_shape(client_model, image_shape)
    client, server = (training_flops(client_model, image_shape),
                      training_flops(server_model, activation_shape, input_grad=True))
    if is_label_private(client_model):
        client += training_flops(client_model.head, output_shape(server_model, activation_shape), input_grad=True)
    return client, server


_shape_cache = {}


def output_shape(module, input_shape):
    """Shape of one sample's output for inputs of shape `input_shape`, on a weightless (meta) copy, once per
    architecture and shape."""
    key = (str(module), tuple(input_shape))
    if key not in _shape_cache:
        with torch.no_grad():
            meta = copy.deepcopy(module).to("meta").eval()
            _shape_cache[key] = tuple(meta(torch.empty(2, *input_shape, device="meta")).shape[1:])
    return _shape_cache[key]


class _ShapeOnly(torch.autograd.Function):
    """Forward: an output of the right shape on the meta device (no data, no arithmetic). Backward: a meta
    gradient for the input, none for the weights, so no gradient tensor is allocated and no optimizer step
    has anything to do."""

    @staticmethod
    def forward(ctx, x, output_shape, dtype, *weights):
        ctx.input_shape, ctx.input_dtype, ctx.num_weights = x.shape, x.dtype, len(weights)
        return torch.empty(len(x), *output_shape, dtype=dtype, device="meta")

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = torch.empty(ctx.input_shape, dtype=ctx.input_dtype, device="meta") if ctx.needs_input_grad[0] else None
        return (grad_input, None, None) + (None,) * ctx.num_weights


class StandIn(nn.Module):
    """A model part that computes only where its work happens, and otherwise just has the right shapes.

    Given real inputs and real weights it is the part itself. Given an input on the meta device (data that
    is elsewhere) or holding meta weights (a part that is elsewhere), it returns a meta output of the real
    output's shape and dtype, and a meta gradient for its input: the loop around it runs, and counts, as in
    training, with no arithmetic. `bench.py --costs-only` runs every scheme with meta stand-ins on meta
    data (`cost_only`); the state dicts and optimizer state of meta weights weigh what real ones weigh.
    A stand-in with meta weights stays on the meta device when the model is moved.
    """

    def __init__(self, part, input_shape):
        super().__init__()
        self.part = part
        self.output_shape = output_shape(part, input_shape)

    @property
    def is_meta(self):
        return next(self.part.parameters()).is_meta

    def _apply(self, fn, recurse=True):
        return self if self.is_meta else super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """A state dict of meta tensors is the state of a copy that lives elsewhere: a real stand-in keeps
        its own (in a distributed run, the copy of another site's part in a client's process)."""
        if not self.is_meta:
            own = self.state_dict(prefix=prefix, keep_vars=True)
            for key, value in list(state_dict.items()):
                if value.is_meta and key in own:
                    state_dict[key] = own[key].detach()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x):
        if not (x.is_meta or self.is_meta):
            return self.part(x)
        dtype = next((torch.get_autocast_dtype(kind) for kind in ("cuda", "cpu") if torch.is_autocast_enabled(kind)),
                     x.dtype)
        return _ShapeOnly.apply(x, self.output_shape, dtype, next(self.part.parameters()))


def meta_copy(module):
    """A copy of `module` whose weights and buffers are on the meta device (same shapes, dtypes and strides),
    made without copying any data: what a process holds of a model copy that lives at another party."""
    memo = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def unwrap(module):
    """`module` with every `StandIn` replaced by the part it stands in for (in place)."""
    if isinstance(module, StandIn):
        return unwrap(module.part)
    for name, child in module.named_children():
        setattr(module, name, unwrap(child))
    return module


def cost_only(client_model, server_model, image_shape):
    """(client, server) stand-ins on the meta device: they count like the real parts at no arithmetic cost.
    (A label-private client part: its layers and its head, each a stand-in.)"""
    client = StandIn(client_model.to("meta"), image_shape)
    server = StandIn(server_model.to("meta"), client.output_shape)
    if is_label_private(client_model):
        client = LabelPrivateClient(OrderedDict(layers=StandIn(client_model.body, image_shape),
                                                head=StandIn(client_model.head, server.output_shape)))
    return client, server
