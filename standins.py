"""Stand-ins: model parts that count like the real ones at no arithmetic cost, where their work happens elsewhere.

`bench.py --costs-only` runs every scheme's unchanged loop on stand-ins of the model parts and images on the meta
device (`cost_only`, with the `CostsOnly` hook), and counts exactly the bytes and FLOPs training counts; a process of
a distributed run holds the parties it is not as stand-ins (`distributed.Transport`). What a stand-in's optimizer
holds is made up front, as Adam makes it at its first step (`adam_state`), so that it weighs what the real one does.
"""
import copy
from collections import OrderedDict

import torch
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from common import output_shape
from labelprivate import LabelPrivateClient


class _ShapeOnly(torch.autograd.Function):
    """Forward: an output of the right shape on the meta device (no data, no arithmetic). Backward: a meta gradient for
    the input, none for the weights, so no gradient tensor is made and no optimizer step has anything to do."""

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

    Given real inputs and real weights it is the part itself. Given an input on the meta device (data that is
    elsewhere), or holding meta weights (a part that is elsewhere), it returns a meta output of the real output's shape
    and dtype, and a meta gradient for its input: the loop around it runs, and counts, as in training. Under torch's
    FLOP counter (any dispatch mode) it runs its part, so that what it stands for is counted. The state dicts and
    optimizer state of meta weights weigh what real ones weigh; a stand-in with meta weights stays on the meta device
    when the model is moved.
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

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Nothing to load into a stand-in whose part is elsewhere (meta weights): the loop passes over it."""
        if self.is_meta:
            return nn.modules.module._IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict, assign)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """A state dict of meta tensors is the state of a copy that lives elsewhere: a real stand-in keeps its own (in a
        distributed run, the copy of another site's part in a client's process)."""
        if not self.is_meta:
            own = self.state_dict(prefix=prefix, keep_vars=True)
            for key, value in list(state_dict.items()):
                if value.is_meta and key in own:
                    state_dict[key] = own[key].detach()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x):
        if not (x.is_meta or self.is_meta) or is_in_torch_dispatch_mode():
            return self.part(x)
        dtype = next((torch.get_autocast_dtype(kind) for kind in ("cuda", "cpu") if torch.is_autocast_enabled(kind)),
                     x.dtype)
        return _ShapeOnly.apply(x, self.output_shape, dtype, next(self.part.parameters()))


def meta_copy(module):
    """A copy of `module` whose weights and buffers are on the meta device (same shapes, dtypes and strides), made
    without copying any data: what a process holds of a model copy that lives at another party."""
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
    """(client, server) stand-ins on the meta device: they count like the real parts at no arithmetic cost. (A client
    part with a head, the U-shaped split's: its layers and its head, each a stand-in.)"""
    client = StandIn(client_model.to("meta"), image_shape)
    server = StandIn(server_model.to("meta"), client.output_shape)
    if hasattr(client_model, "head"):
        client = LabelPrivateClient(OrderedDict(layers=StandIn(client_model.body, image_shape),
                                                head=StandIn(client_model.head, server.output_shape)))
    return client, server


def adam_state(optimizer):
    """Adam's state for every weight of `optimizer` (two moments and a step count), made as Adam makes it at its first
    step where it has none yet: the state split learning hands on then exists from the start and weighs the same in
    every process, in a cost-only run (where no step computes) and in a checkpoint restored before any step."""
    fused = optimizer.defaults.get("fused")
    for group in optimizer.param_groups:
        for weight in group["params"]:
            optimizer.state[weight] = optimizer.state.get(weight) or dict(
                step=torch.zeros((), dtype=torch.float32, device=weight.device if fused else "cpu"),
                exp_avg=torch.zeros_like(weight, memory_format=torch.preserve_format),
                exp_avg_sq=torch.zeros_like(weight, memory_format=torch.preserve_format))


class CostsOnly:
    """The hook of a cost-only run: its optimizers' state made up front (`adam_state`), as no step makes it."""

    def started(self, run, state):
        for optimizer in state:
            if isinstance(optimizer, torch.optim.Optimizer):
                adam_state(optimizer)
