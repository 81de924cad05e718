"""The bench against its own training steps as a plain PyTorch loop, timed in one process (docs/speed.md).

    python tests/against_plain.py              # the default bench: 7 schemes x 5 rounds x 16 steps = 560 steps
    python tests/against_plain.py --rounds 1   # any bench flags; the step count follows from them

The plain loop trains the same model (DenseNet-121, one logit, channels-last, fused Adam) on random batches of
the bench's batch size and image size, once before the bench and once after it (the host's speed drifts), for
at most `SAMPLE` steps each (scaled to the bench's count: the rate is what is compared), and the ratio is the
bench's wall time over that. Not a test: a timing that load can flip.
"""
import statistics
import sys
import time

import torch
from torch import nn

import bench
from common import batch_bounds
from densenet_split import split_densenet121

SAMPLE = 140  # plain steps timed before and after the bench (a quarter of the default's 560)


def plain_seconds(steps, image_size, batch_size, seed=0):
    """Seconds of `steps` training steps of DenseNet-121 as a plain loop, after two untimed ones."""
    torch.manual_seed(seed)
    model = nn.Sequential(*split_densenet121()).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    images = torch.rand(batch_size, 1, image_size, image_size).contiguous(memory_format=torch.channels_last)
    labels = (torch.arange(batch_size) % 2).float()

    def step():
        loss = nn.functional.binary_cross_entropy_with_logits(model(images).squeeze(1), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def main(argv):
    args, _ = bench.parse_args(argv)
    # the mini-batch steps the bench trains: every site's batches, every round, every job
    steps = sum(len(batch_bounds(len(train_set), args.batch_size)) for train_set in bench.load_sites(args)[0]) \
        * args.rounds * len(bench.jobs(args))
    timed = min(steps, SAMPLE)
    before = plain_seconds(timed, args.image_size, args.batch_size) * steps / timed
    start = time.perf_counter()
    bench.main(argv)
    seconds = time.perf_counter() - start
    after = plain_seconds(timed, args.image_size, args.batch_size) * steps / timed
    plain = statistics.mean([before, after])
    print(f"\nbench {seconds:.1f} s; {steps} plain steps {before:.1f} s before, {after:.1f} s after "
          f"({plain / steps * 1000:.0f} ms a step); ratio {seconds / plain:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
