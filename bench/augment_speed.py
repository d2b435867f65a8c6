"""Cost of batched augmentation (microseconds per image) next to one training step. Prints JSON.

    python bench/augment_speed.py [--batch-size 32] [--repeats 7] [--calls 50]

On one thread: BatchAugment's light and standard presets at 40x40x1, 40x40x3 and 96x96x3,
and one Adam step (forward, backward, update) of SimpleCNN at 40x40x1 on the same batch
size. Each figure is the median over `repeats` timings of `calls` calls, after warm-up;
the ratio is what the augmentation adds to a 40x40x1 training step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from imgpipe.models.networks import SimpleCNN
from imgpipe.training.augment import BatchAugment

SHAPES = ((40, 1), (40, 3), (96, 3))  # (size, channels)


def median_seconds_per_call(call: Callable[[], object], repeats: int, calls: int) -> float:
    for _ in range(max(3, calls // 5)):
        call()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        timings.append((time.perf_counter() - started) / calls)
    return statistics.median(timings)


def augment_seconds(preset: str, size: int, channels: int, batch_size: int, repeats: int, calls: int) -> float:
    augment = BatchAugment(preset, channels)
    images = torch.randint(0, 256, (batch_size, channels, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    return median_seconds_per_call(lambda: augment(images, generator), repeats, calls)


def train_step_seconds(size: int, channels: int, batch_size: int, repeats: int, calls: int) -> float:
    torch.manual_seed(0)
    model = SimpleCNN(channels, num_classes=10).train()
    optimizer = torch.optim.Adam(model.parameters())
    images = torch.rand(batch_size, channels, size, size)
    labels = torch.randint(0, 10, (batch_size,))

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return median_seconds_per_call(step, repeats, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_image = 1e6 / args.batch_size
    augment_us = {
        preset: {f"{size}x{size}x{channels}": round(per_image * augment_seconds(
            preset, size, channels, args.batch_size, args.repeats, args.calls), 2)
            for size, channels in SHAPES}
        for preset in ("light", "standard")
    }
    step_us = per_image * train_step_seconds(40, 1, args.batch_size, args.repeats, args.calls)
    print(json.dumps({
        "threads": 1,
        "batch_size": args.batch_size,
        "augment_us_per_image": augment_us,
        "simple_cnn_adam_step_us_per_image_40x40x1": round(step_us, 2),
        "augment_over_step_40x40x1": {preset: round(figures["40x40x1"] / step_us, 4)
                                      for preset, figures in augment_us.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
