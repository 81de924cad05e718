"""Checkpoints: a run that is stopped (Ctrl-C, a kill, a power cut) goes on from its last complete round.

`Checkpoint(path)` is a hook of a `common.Run`: after every round it writes every model copy and optimizer the loop
keeps (`run.rounds(...)`), the run's own state (`RUN_STATE`: the ledger, the history, the training time, split
learning's holder) and that of the hooks it is given to keep (the transport's, the aggregator's checks'), atomically
and in the background; a run that starts with a checkpoint at `path` loads it and goes on after its last round, to
the result an uninterrupted run gives, bit for bit on a CPU. Under `--distributed` each party keeps its own (its last
two), and the parties agree on the last round all of them have (`distributed.Transport.agree`).
docs/reproducibility.md says what is exact where. Files are written whole or not at all (`written`).
"""
import contextlib
import hashlib
import io
import os
import threading

import torch

from common import __version__
from standins import adam_state

RUN_STATE = ("bytes", "messages", "flops", "seconds", "history", "holder")  # what a checkpoint keeps of a `Run`


def tree_map(function, objects):
    """`objects` (tensors in tuples, lists and dicts, as `run.send` takes them) with every tensor mapped."""
    if isinstance(objects, torch.Tensor):
        return function(objects)
    if isinstance(objects, dict):
        return {key: tree_map(function, value) for key, value in objects.items()}
    if isinstance(objects, (list, tuple)):
        return type(objects)(tree_map(function, value) for value in objects)
    return objects


def leaves(objects):
    """The tensors of `objects`, in order."""
    found = []
    tree_map(found.append, objects)
    return found


def one_line(error):
    """An exception as one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def pack(state):
    """The tensors of `state` (a state dict, nested), flattened and joined into one new tensor per dtype, where
    they are: a checkpoint of a few large tensors saves and loads many times faster than one of thousands."""
    by_dtype = {}
    for tensor in leaves(state):
        by_dtype.setdefault(str(tensor.dtype), []).append(tensor.detach().reshape(-1))
    return {dtype: torch.cat(parts) for dtype, parts in by_dtype.items()}


def unpack(packed, like):
    """`like` (a state dict shaped as the one `pack` packed) with the packed values, in the same order."""
    used = dict.fromkeys(packed, 0)

    def take(tensor):
        dtype, start = str(tensor.dtype), used.get(str(tensor.dtype), 0)
        used[dtype] = start + tensor.numel()
        if dtype not in packed or used[dtype] > packed[dtype].numel():
            raise ValueError("the checkpoint holds other model parts")
        # in the memory layout of `like`'s tensor (channels-last, say): fused Adam pairs a weight's elements
        # with its moments' by their place in memory
        return torch.empty_like(tensor, device="cpu").copy_(packed[dtype][start:used[dtype]].view(tensor.shape))
    state = tree_map(take, like)
    if any(used[dtype] != values.numel() for dtype, values in packed.items()):
        raise ValueError("the checkpoint holds other model parts")
    return state


def previous(path):
    """Where the checkpoint before `path`'s is kept, when one is (`save_checkpoint(keep_previous=True)`)."""
    return path.removesuffix(".pt") + ".previous.pt"


def private(path, flags):
    """`open`'s opener for a file only its owner reads: created new (O_EXCL), not through a symbolic link
    (O_NOFOLLOW), mode 0600. What is already at `path` (a temporary file a killed run left, a planted link) is
    removed first: a link itself, never what it points to."""
    flags |= os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, flags, 0o600)


@contextlib.contextmanager
def written(path, mode="w", keep=None):
    """`open(path, mode)` for writing, atomically: the file is written under a temporary name beside `path`,
    flushed to the disk, then renamed over it, so that a full disk, a kill or a power cut during the write leaves
    the file it replaces whole (and no partial one). `keep`: where the file it replaces is moved first. A write
    that fails removes the temporary file and raises OSError naming `path`. The file is its owner's alone (mode
    0600: checkpoints and models are trained on patients' images, kits hold keys), and the temporary one is made
    anew, never through a link planted at its name."""
    temporary = f"{path}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(temporary, mode, opener=private, **({} if "b" in mode else dict(newline=""))) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        if keep and os.path.exists(path):
            os.replace(path, keep)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if isinstance(error, OSError):  # a full disk, a folder that is a file, no permission: the file's, in one line
            raise OSError(f"{path}: {error.strerror or error}") from None
        raise


class Digesting:
    """A file being written that keeps the SHA-256 of what is written to it, and the error a write raised."""

    def __init__(self, file):
        self.file, self.digest, self.error = file, hashlib.sha256(), None

    def write(self, data):
        """Write all of `data` (torch takes a short count for an error: a full disk then raises OSError here)."""
        view = memoryview(data).cast("B")
        self.digest.update(view)
        left = view
        try:
            while left:
                left = left[self.file.write(left):]
        except OSError as error:
            self.error = error
            raise
        return view.nbytes

    def flush(self):
        self.file.flush()


def save_into(value, file):
    """`torch.save(value)` into an open `file`; returns the SHA-256 of what it wrote. A write that fails raises
    its own OSError (torch's would be a RuntimeError that says only "unexpected pos")."""
    contents = Digesting(file)
    try:
        torch.save(value, contents)
    except RuntimeError:
        if contents.error:
            raise contents.error from None
        raise
    return contents.digest.hexdigest()


TRAILER = b"\nsplitmed-checkpoint "  # then: the package version, "sha256", the contents' digest, a newline


def save_checkpoint(checkpoint, path, keep_previous=False):
    """`torch.save`, then a last line with the package version and the SHA-256 of the contents, `written`
    atomically. `keep_previous`: the checkpoint it replaces is kept as `previous(path)` (a party of a
    distributed run may have to go back a round)."""
    with written(path, "wb", keep=previous(path) if keep_previous else None) as file:
        digest = save_into(checkpoint, file)
        file.write(TRAILER + f"{__version__} sha256 {digest}\n".encode())


class CheckpointWriter:
    """Writes checkpoints while training goes on: `write` takes a checkpoint whose tensors nothing changes
    afterwards (`pack` makes new ones), moves them to the CPU, and a thread saves it (`save_checkpoint`: on
    the disk, then renamed into place); `wait` returns when the last write is done, with its exception if it
    raised one (the caller's to raise or report: `Checkpoint.saved`)."""

    def __init__(self):
        self.thread, self.error = None, None

    def write(self, checkpoint, path, keep_previous=False):
        error = self.wait()
        if error:
            raise error
        snapshot = tree_map(lambda tensor: tensor.detach().cpu(), checkpoint)  # (containers copied too)

        def save():
            try:
                save_checkpoint(snapshot, path, keep_previous)
            except BaseException as error:  # a full disk, or an interruption: the caller's to raise
                self.error = error
        self.thread = threading.Thread(target=save, name="checkpoint")
        self.thread.start()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
        error, self.thread, self.error = self.error, None, None
        return error


writer = CheckpointWriter()  # one writer per process: a run's checkpoint is on the disk before the next starts


def load_checkpoint(path):
    """A checkpoint written by `Checkpoint`, tensors on the CPU, loaded with `weights_only=True` (tensors, numbers,
    strings and containers; no code runs) once its digest matches its contents and its structure is a run's. A
    file that is missing, partial, changed, damaged, of another version or of another structure: ValueError
    naming it, in one line. (The digest finds damage and edits, not a forger: whoever can write the file can
    write its digest too.)"""
    try:
        with open(path, "rb") as file:
            contents = file.read()
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror or error}") from None
    at = contents.rfind(TRAILER)
    trailer = contents[at + len(TRAILER):].decode(errors="replace").split() if at >= 0 else []
    if len(trailer) != 3 or trailer[1] != "sha256" or not contents.endswith(b"\n"):
        raise ValueError(f"{path}: not a whole checkpoint (no digest at its end)")
    version, _, digest = trailer
    if version != __version__:
        raise ValueError(f"{path}: a checkpoint of splitmed {version}, not of this version ({__version__})")
    if hashlib.sha256(memoryview(contents)[:at]).hexdigest() != digest:
        raise ValueError(f"{path}: its contents do not match its digest (changed or damaged)")
    try:
        checkpoint = torch.load(io.BytesIO(memoryview(contents)[:at]), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a whole checkpoint ({type(error).__name__})") from None
    problem = structure_problem(checkpoint)
    if problem:
        raise ValueError(f"{path}: not a checkpoint of a scheme's run ({problem})")
    return checkpoint


def structure_problem(checkpoint):
    """What is wrong with the structure of a loaded checkpoint, or None: `Checkpoint.started` then uses it
    without a KeyError or a TypeError."""
    tensors = lambda value: isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                             for k, v in value.items())
    numbers = lambda value: isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values())
    if not isinstance(checkpoint, dict) or not {"settings", "state", "run", "hooks"} <= set(checkpoint):
        return "settings, state, run and hooks expected"
    run = checkpoint["run"]
    if not isinstance(checkpoint["settings"], dict):
        return "settings"
    if not isinstance(checkpoint["state"], list) or not all(part is None or tensors(part) for part in checkpoint["state"]):
        return "state"
    if (not isinstance(run, dict) or not all(numbers(run.get(ledger)) for ledger in ("bytes", "messages", "flops"))
            or not isinstance(run.get("seconds"), (int, float)) or not isinstance(run.get("history"), list)
            or not all(isinstance(entry, dict) for entry in run["history"]) or not isinstance(run.get("holder"), int)):
        return "run"
    if not isinstance(checkpoint["hooks"], list) or not all(isinstance(state, dict) for state in checkpoint["hooks"]):
        return "hooks"
    return None


def settings(run, noted):
    """What a checkpoint records of the run that wrote it, and a run resuming from it must repeat; `noted`: what else
    it must repeat (the bench's defense)."""
    return dict(scheme=run.scheme, seed=run.cfg["seed"], bn=run.cfg["bn"], order=run.cfg["order"],
                batch_size=run.batch_size, lr=run.lr, bf16=run.cfg["bf16"], num_examples=[len(s) for s in run.train_sets],
                image_shape=list(run.image_shape), **noted)


class Checkpoint:
    """Makes a run resumable from `path` (see the module's docstring): a hook of the run. `transport`: the run's, under
    `--distributed`; `keep`: the hooks whose state goes with the run's (`state_dict`, `load_state_dict`); `noted`:
    settings besides the run's that a run resuming from it must repeat."""

    def __init__(self, path, transport=None, keep=(), noted=None):
        self.path, self.transport, self.keep, self.noted, self.state = path, transport, list(keep), noted or {}, ()
        self.error = None  # the first write that failed (a full disk): training goes on, the row reports it

    def saved(self):
        """Wait for the last write; one that failed (a full disk) is kept in `error`, and training goes on."""
        error = writer.wait()
        if isinstance(error, Exception):
            self.error = self.error or one_line(error)
        elif error:
            raise error

    def started(self, run, state):
        """Load the newest checkpoint (under a transport: of the last round every party has) into `state`, the
        loop's model copies and optimizers, and into the run."""
        self.state = state
        for optimizer in state:  # (a fresh optimizer has no state to load into before its first step)
            if isinstance(optimizer, torch.optim.Optimizer):
                adam_state(optimizer)
        found = {}  # by the number of rounds done
        for saved in (self.path, previous(self.path)) if self.transport else (self.path,):
            if os.path.exists(saved):
                checkpoint = load_checkpoint(saved)
                found[len(checkpoint["run"]["history"])] = saved, checkpoint
                if len(checkpoint["run"]["history"]) > run.num_rounds:
                    raise ValueError(f"{saved}: {len(checkpoint['run']['history'])} rounds done, more than {run.num_rounds}")
        # Under a transport every party goes on from the last round all of them have a checkpoint of (a party
        # killed during a round's write has the round before; the others keep that one too).
        done = self.transport.agree(found, run.num_rounds) if self.transport else max(found, default=0)
        if done == 0:
            return
        path, checkpoint = found[done]
        expected = settings(run, self.noted)
        differs = [key for key in expected if checkpoint["settings"].get(key) != expected[key]]
        if differs or len(checkpoint["state"]) != len(state) or len(checkpoint["hooks"]) != len(self.keep):
            raise ValueError(f"{path}: a checkpoint of another run ({', '.join(differs) or 'its model copies'} differ)")
        try:
            for holder, saved in zip(state, checkpoint["state"]):
                if saved is not None:  # None: a copy another process holds (under a transport)
                    holder.load_state_dict(unpack(saved, holder.state_dict()))
            for key in RUN_STATE:
                setattr(run, key, dict(checkpoint["run"][key]) if key in ("bytes", "messages", "flops")
                        else checkpoint["run"][key])
            for hook, hook_state in zip(self.keep, checkpoint["hooks"]):
                hook.load_state_dict(hook_state)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as error:
            raise ValueError(f"{path}: not a checkpoint of this run ({one_line(error)})") from None

    def round_ending(self, run):
        if self.transport:  # no party passes a round's end before every party's last checkpoint is on its disk
            self.saved()

    def round_ended(self, run, entry, deployed):
        weights = lambda holder: holder.param_groups[0]["params"] if hasattr(holder, "param_groups") else list(holder.parameters())
        state = [None if weights(holder)[0].is_meta else pack(holder.state_dict()) for holder in self.state]
        self.saved()
        writer.write(dict(settings=settings(run, self.noted), state=state,
                          run={key: getattr(run, key) for key in RUN_STATE}, hooks=[hook.state_dict() for hook in self.keep]),
                     self.path, keep_previous=self.transport is not None)

    def finished(self, run, result):
        self.saved()  # the last round's checkpoint is on the disk before the run reports
        if self.error:
            result.setdefault("failed", {})["checkpoint"] = self.error
