"""Where a run's time and memory go: the profile of one scheme's training (`Profile`, `bench.py --profile`), the
warm-up that keeps a process's first kernels out of its first scheme's time (`WarmUp`), which kernels run
(`set_determinism`), and this process's memory."""
import contextlib
import copy
import os
import resource
import time

import torch
import torch.optim.optimizer as optimizer_hooks

from common import batch_bounds, output_shape


def restart_peak_memory():
    """Linux: the peak resident memory of this process starts again from what is resident now."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def resident_memory(field="VmHWM"):
    """This process's resident memory in bytes: its peak since `restart_peak_memory` ("VmHWM"), or now ("VmRSS").
    Linux; elsewhere the peak since the process started."""
    try:
        with open("/proc/self/status") as file:
            return next(int(line.split()[1]) * 1024 for line in file if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class WarmUp:
    """One untimed training step of a copy of each model part, per batch size a federation trains with: first kernel
    loads, cuDNN's choices and allocator growth happen here, so that a run's first scheme does not pay them in its
    round 1. Once per process for each architecture, input shape, batch size and setting (what it prepares is the
    process's, and the next scheme finds it done); the parts, their optimizers and the random state are untouched."""

    def __init__(self):
        self.done = set()

    def __call__(self, parts, train_sets, batch_size, device, bf16=False, channels_last=True):
        """`parts`: in the order data flows through them (a label-private client's head last); a part held by another
        process (meta weights) is skipped."""
        device = torch.device(device)
        sizes = {end - start for dataset in train_sets for start, end in batch_bounds(len(dataset), batch_size)}
        shape = tuple(train_sets[0][0][0].shape)
        for index, part in enumerate(parts):
            setting = (str(part), shape, str(device), bf16, channels_last)
            cold = sorted(size for size in sizes if (setting, size) not in self.done)
            if cold and not next(part.parameters()).is_meta:
                part = copy.deepcopy(part).to(device).train()
                if channels_last:
                    part.to(memory_format=torch.channels_last)
                optimizer = torch.optim.Adam(part.parameters(), fused=device.type in ("cpu", "cuda"))
                for size in cold:
                    self.done.add((setting, size))
                    inputs = torch.zeros(size, *shape, device=device, requires_grad=index > 0)
                    if channels_last and inputs.dim() == 4:
                        inputs = inputs.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        outputs = part(inputs)
                    outputs.float().sum().backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            shape = output_shape(part, shape)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the clock starts on an idle GPU


class Profile:
    """Where one scheme's training time goes: forward passes, backward passes, optimizer steps, transfers
    (`run.send`) and the rest (batches, loss, bookkeeping), and peak memory; a hook of the run. Timed while the run's
    own clock runs (set-up and scoring apart), with torch's global module and optimizer hooks and, for a backward pass,
    a hook on the graph node of each outermost module's output; on CUDA it synchronises at every boundary, so the run
    itself is slower. Last among the run's hooks, so that the transfers it times hold the others' work on them."""

    PARTS = ("forward", "backward", "optimizer", "transfers")

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.depth, self.since, self.paused, self.in_backward = 0, None, True, False

    def round_started(self, run):
        self.paused = False

    def round_ending(self, run):
        self.paused = True

    def sending(self, run, source, destination, link, objects):
        self._start()
        return objects

    def sent(self, run, source, destination, link, objects):
        self._stop("transfers")
        return objects

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _start(self, *args):
        self.depth += 1
        if self.depth == 1 and not self.paused:
            self.since = self._now()

    def _stop(self, part):
        self.depth -= 1
        if self.depth == 0 and self.since is not None:
            self.seconds[part] += self._now() - self.since
            self.since = None

    def _forward_ended(self, module, inputs, output):
        """An outermost module's forward: its backward pass starts where the gradient reaches its output."""
        if self.depth == 1 and not self.paused and isinstance(output, torch.Tensor) and output.grad_fn is not None:
            output.grad_fn.register_prehook(self._backward_started)
        self._stop("forward")

    def _backward_started(self, grad_outputs):
        if not self.in_backward:
            self.in_backward = True
            self._start()
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)  # at the pass's end

    def _backward_ended(self):
        self.in_backward = False
        self._stop("backward")

    @contextlib.contextmanager
    def measure(self):
        """Time everything run inside; peak memory is that of this block (GPU) or of the process (CPU)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            restart_peak_memory()
        handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._start),
                   torch.nn.modules.module.register_module_forward_hook(self._forward_ended),
                   optimizer_hooks.register_optimizer_step_pre_hook(self._start),
                   optimizer_hooks.register_optimizer_step_post_hook(lambda *args: self._stop("optimizer"))]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
        self.peak_bytes = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                           else resident_memory())

    def row(self, result, human):
        """The profile table's row of a scheme's `result`; `human` writes bytes."""
        images = result["history"][-1]["round"] * sum(result["num_examples"])
        total = result["seconds"]
        shares = [f"{100 * self.seconds[part] / total:.0f}%" for part in self.PARTS]
        other = f"{100 * (1 - sum(self.seconds.values()) / total):.0f}%"
        return [result["scheme"], f"{images / total:.1f}", *shares, other, human(self.peak_bytes, "B")]


def set_determinism(deterministic):
    """--deterministic: deterministic kernels only (an error names any operation that has none), no cuDNN autotuning,
    and a fixed cuBLAS workspace (read when cuBLAS starts, so this runs before any CUDA work). The CPU is deterministic
    for a given number of threads without it."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = False
