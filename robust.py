"""Robust aggregation: the aggregator's checks on what clients upload for averaging, and poisoned uploads to test them.

`Screen` is the hook that leaves out of a round's average an upload with a value that is not finite or one far from the
round's median upload (`refused_uploads`), names it in the log and in the result's "refused"; `Poison` spoils one
client's uploads on their way (`bench.py --poison`), for the checks to refuse.
"""
import math
import statistics

import torch


def not_finite(tensors):
    """Whether any floating-point value among `tensors` is NaN or infinite. A tensor's sum is finite when all of its
    values are: one fast reduction a tensor and one host sync; only a tensor whose sum is not (a value that is not, or
    an overflow) is read value by value."""
    floats = [tensor for tensor in tensors if tensor.is_floating_point() and tensor.numel()]
    if not floats:
        return False
    sums_finite = torch.stack([tensor.sum().float() for tensor in floats]).isfinite().tolist()
    return any(not finite and not bool(tensor.isfinite().all()) for finite, tensor in zip(sums_finite, floats))


def refused_uploads(state_dicts, max_ratio):
    """Why each of a round's uploads for averaging is refused, or None where it is not: an upload with a value that is
    not finite; else, with three uploads or more, one farther from the round's coordinate-wise median upload than
    `max_ratio` times the median of those distances (a scaled, an unrelated or a sign-flipped model). With two
    uploads each is as far from their median as the other: only what is not finite shows."""
    reasons = ["not finite" if not_finite(state_dict.values()) else None for state_dict in state_dicts]
    finite = [site for site, reason in enumerate(reasons) if reason is None]
    if len(finite) < 3 or max_ratio == math.inf:
        return reasons
    squares = []  # per weight, each finite upload's squared distance from the median upload's
    for key, value in state_dicts[finite[0]].items():
        if value.is_floating_point():
            values = [state_dicts[site][key].detach().float() for site in finite]
            middle = coordinate_median(values)
            squares.append(torch.stack([torch.linalg.vector_norm(v - middle, dtype=torch.float64) for v in values]) ** 2)
    distances = torch.stack(squares).sum(0).sqrt().tolist()
    typical = statistics.median(distances)
    for site, distance in zip(finite, distances):
        if typical > 0 and distance > max_ratio * typical:
            reasons[site] = (f"{distance / typical:.3g}x the median distance from the round's median update "
                             f"(limit {max_ratio:g})")
    return reasons


def coordinate_median(tensors):
    """The element-wise median of tensors of one shape (for an even count, the mean of the two middle values): for a
    few, an odd-even transposition network of minimums and maximums (as many passes as tensors, each element-wise,
    faster than sorting along a stack), else that sort."""
    if len(tensors) > 16:
        ordered = list(torch.stack(tensors).sort(dim=0).values)
    else:
        ordered = list(tensors)
        for step in range(len(ordered)):
            for i in range(step % 2, len(ordered) - 1, 2):
                ordered[i], ordered[i + 1] = torch.minimum(ordered[i], ordered[i + 1]), torch.maximum(ordered[i], ordered[i + 1])
    return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2


class Screen:
    """The aggregator's checks, as a run's hook: the uploads of a round that pass `refused_uploads` (at `max_ratio`),
    with their sites' numbers of examples; a refused one is named in the log and in the result's "refused", and left
    out of the round's average. Every upload refused: ValueError, the run stops. (A process that holds none of them,
    under a transport: all of them.)"""

    def __init__(self, max_ratio=10.0):
        if not max_ratio > 0:  # (NaN is not either)
            raise ValueError(f"max_update_ratio must be positive (inf: no upload refused for its distance), not {max_ratio!r}")
        self.max_ratio, self.refused = max_ratio, []

    def screened(self, run, uploads, num_examples):
        if any(tensor.is_meta for upload in uploads for tensor in upload.values()):
            return uploads, num_examples
        reasons = refused_uploads(uploads, self.max_ratio)
        round = len(run.history) + 1
        for site, reason in enumerate(reasons):
            if reason:
                self.refused.append(dict(round=round, site=site, reason=reason))
                if run.cfg["log"]:
                    run.cfg["log"](f"{run.scheme}: client {site}'s update refused: {reason} (round {round})")
        if all(reasons):
            raise ValueError(f"round {round}: every update refused ({'; '.join(dict.fromkeys(reasons))})")
        kept = [site for site, reason in enumerate(reasons) if not reason]
        return [uploads[site] for site in kept], [num_examples[site] for site in kept]

    def finished(self, run, result):
        result["refused"] = list(self.refused)

    def state_dict(self):
        return dict(refused=self.refused)

    def load_state_dict(self, state):
        self.refused = list(state["refused"])


class Poison:
    """--poison SITE:nan|SITE:SCALE: what client SITE uploads for averaging is spoiled on its way (a NaN in its first
    weight, or every weight times SCALE), where this process holds it: the aggregator's checks are to refuse it."""

    def __init__(self, site, scale):
        self.site, self.scale = site, scale

    def sending(self, run, source, destination, link, objects):
        if link != "client->aggregator" or source != self.site or objects[0][next(iter(objects[0]))].is_meta:
            return objects
        spoiled = {key: value.clone() for key, value in objects[0].items()}
        weights = [value for value in spoiled.values() if value.is_floating_point()]
        if math.isnan(self.scale):
            weights[0].view(-1)[0] = math.nan
        else:
            torch._foreach_mul_(weights, self.scale)
        return (spoiled, *objects[1:])
