"""The wire: point-to-point messages between the processes of a distributed run, with nothing believed.

Per transfer a length, a header (per tensor: dtype, shape, strides, offset) and one payload of the tensors' bytes in
their own memory order (no pickle), so that the receiver rebuilds them bit for bit, channels-last included; the
receiver compares every number of the header with what the schedule expects before it allocates anything. Over
gloo (`Gloo`), or sealed on a mesh of the parties' own (`secure.Mesh`, with --key), which has the same calls.
"""
import contextlib
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import secure
from robust import not_finite
from secure import party_name

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8,
          torch.bool)


class PartyFailed(Exception):
    """Another party died, hung or broke the protocol; the message names it."""


def placeholder(tensor):
    """A tensor's shape and dtype on the meta device: what a process that does not hold it carries on with."""
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")


def memory_order(tensor):
    """The tensor's elements in the order they lie in memory (no copy for a dense tensor), and its strides."""
    order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))
    permuted = tensor.permute(order)
    if not permuted.is_contiguous():  # not dense (a strided view): send it as a standard contiguous tensor
        tensor = tensor.contiguous()
        return tensor.reshape(-1), tensor.stride()
    return permuted.reshape(-1), tensor.stride()


class Gloo:
    """The wire's messages as gloo's point-to-point sends: neither authenticated nor encrypted (`secure.Mesh`
    is, with the same calls)."""

    def isend(self, tensor, peer):
        return dist.isend(tensor, peer)

    def recv(self, buffer, peer, timeout):
        dist.irecv(buffer, peer).wait(timeout)
        return buffer

    def overhead(self, size):
        return 0

    def close(self):
        dist.barrier()
        dist.destroy_process_group()


class Wire:
    """Point-to-point messages between this process and its peers (no pickle): per transfer a length, a header
    (per tensor: dtype, shape, strides, offset) and one payload of the tensors' bytes in their own memory
    order, so that the receiver rebuilds them bit for bit; over gloo, or sealed on a mesh of the parties' own
    (`secure.Mesh`, with --key). It notes how long this process waits for a peer."""

    def __init__(self, rank, store, timeout, device, channel=None):
        self.rank, self.store, self.timeout, self.device = rank, store, timeout, device
        self.channel = channel or Gloo()
        self.waits = []  # (start, end) on the monotonic clock: waiting for a peer
        self.in_flight = []  # sends not yet complete: (peer, messages, their works)

    def fail(self, peer, error):
        """Name the party that failed first (another process may have noted it in the store) and stop. A
        message that failed authentication names no party: anyone on the network may have sent it."""
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        message = reason if isinstance(error, secure.AuthenticationFailed) else f"{party_name(peer)} failed ({reason})"
        with contextlib.suppress(Exception):
            if self.store.check(["failed"]):
                message = self.store.get("failed").decode()
            else:
                self.store.set("failed", message)
        raise PartyFailed(message)

    def send(self, peer, tensors):
        """Send `tensors` to `peer` without waiting for them to arrive; returns the payload's bytes and the
        framing's: the length and the header, and with --key a tag per MiB of each message (`secure.overhead`)."""
        flats = [memory_order(t.detach()) for t in tensors]
        by_size = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())  # aligned offsets
        offsets, offset = [0] * len(tensors), 0
        for i in by_size:
            offsets[i] = offset
            offset += tensors[i].numel() * tensors[i].element_size()
        header = [len(tensors)]
        for t, (_, stride), start in zip(tensors, flats, offsets):
            header += [DTYPES.index(t.dtype), t.dim(), *t.shape, *stride, start]
        payload = torch.cat([torch.empty(0, dtype=torch.uint8)] + [flats[i][0].cpu().view(torch.uint8) for i in by_size])
        messages = [message for message in (torch.tensor([len(header)]), torch.tensor(header), payload) if len(message)]
        try:
            self.in_flight.append((peer, messages, [self.channel.isend(message, peer) for message in messages]))
        except Exception as error:
            self.fail(peer, error)
        self.settle(wait=False)
        return len(payload), 8 + 8 * len(header) + sum(self.channel.overhead(m.numel() * m.element_size()) for m in messages)

    def settle(self, wait=True):
        """Complete this process's sends in flight (wait=True), or let go of those already done. A party does
        not wait for what it sends to arrive, only for what it receives: a server streams one client's
        gradients while it serves the next, each on its own line. Every round's sends settle before the
        round's clock stops (`Transport.round_ending`)."""
        started, unsettled = time.perf_counter(), []
        for peer, messages, works in self.in_flight:
            try:
                if wait:
                    for work in works:
                        work.wait(timedelta(seconds=self.timeout))
                elif not all(work.is_completed() for work in works):
                    unsettled.append((peer, messages, works))
            except Exception as error:
                self.fail(peer, error)
        self.in_flight = unsettled
        if wait:
            self.waits.append((started, time.perf_counter()))

    def _recv(self, buffer, peer):
        started = time.perf_counter()
        self.channel.recv(buffer, peer, timedelta(seconds=self.timeout))
        self.waits.append((started, time.perf_counter()))
        return buffer

    def receive(self, peer, given, finite_on=None):
        """Receive tensors shaped like `given`: into them where they are real, into new ones where not. Nothing
        the peer declares is believed: the header's length, each tensor's dtype and shape, its strides and its
        place in the payload are compared with what the schedule expects (`given`) before the payload is
        allocated; a header that differs stops the run naming the sender. `finite_on`: the link whose values
        must be finite, checked in the payload before they go anywhere (no GPU sync); None: not checked."""
        expected = 1 + sum(3 + 2 * target.dim() for target in given)
        try:
            length = int(self._recv(torch.empty(1, dtype=torch.int64), peer))
            if length != expected:
                raise PartyFailed(f"protocol error: {party_name(peer)} sent a header of {length} numbers, "
                                  f"{party_name(self.rank)} expected {expected}")
            header = self._recv(torch.empty(expected, dtype=torch.int64), peer).tolist()
            if header[0] != len(given):
                raise PartyFailed(f"protocol error: {party_name(peer)} sent {header[0]} tensors, "
                                  f"{party_name(self.rank)} expected {len(given)}")
            entries, at = [], 1
            total = sum(target.numel() * target.element_size() for target in given)
            for target in given:
                index, ndim = header[at], header[at + 1]
                dtype = DTYPES[index] if 0 <= index < len(DTYPES) else None
                shape, stride = header[at + 2:at + 2 + ndim], header[at + 2 + ndim:at + 2 + 2 * ndim]
                start = header[at + 2 + 2 * ndim]
                if dtype != target.dtype or ndim != target.dim() or tuple(shape) != tuple(target.shape):
                    raise PartyFailed(f"protocol error: {party_name(peer)} sent {dtype or 'an unknown dtype'} "
                                      f"{tuple(shape)} where {party_name(self.rank)} expected {target.dtype} "
                                      f"{tuple(target.shape)}")
                size = target.numel() * target.element_size()
                reach = sum((n - 1) * step for n, step in zip(shape, stride)) + 1 if target.numel() else 0
                if (min(stride, default=0) < 0 or start < 0 or start % target.element_size() or start + size > total
                        or reach > target.numel()):
                    raise PartyFailed(f"protocol error: {party_name(peer)} sent a tensor that does not fit its "
                                      f"place in the message (strides {stride}, offset {start})")
                entries.append((stride, start))
                at += 3 + 2 * ndim
            payload = self._recv(torch.empty(total, dtype=torch.uint8), peer) if total else torch.empty(0, dtype=torch.uint8)
        except PartyFailed:
            raise
        except Exception as error:
            self.fail(peer, error)
        arrived = [payload[start:start + target.numel() * target.element_size()].view(target.dtype)
                   .as_strided(target.shape, stride) for target, (stride, start) in zip(given, entries)]
        if finite_on and not_finite(arrived):
            self.fail(peer, f"sent values that are not finite on {finite_on}, refused by {party_name(self.rank)}")
        received = []
        for target, tensor in zip(given, arrived):
            if target.is_meta:
                received.append(tensor.to(self.device, non_blocking=True))
            else:
                with torch.no_grad():
                    target.copy_(tensor)
                received.append(target)
        return received
