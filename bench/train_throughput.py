"""Training throughput (images/s) of one architecture on this machine's CPU. Prints JSON.

    python bench/train_throughput.py [--arch resnet18] [--size 40] [--channels 1] [--batch-size 32]

Times full optimizer steps (forward, backward, Adam) on random data for each thread
count, after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from imgpipe.models.networks import build_model


def images_per_second(arch: str, size: int, channels: int, batch_size: int, threads: int, seconds: float) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=channels, image_size=size).train()
    optimizer = torch.optim.Adam(model.parameters())
    images = torch.randn(batch_size, channels, size, size)
    labels = torch.randint(0, 10, (batch_size,))

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step(), step()
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        step()
        done += batch_size
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=40)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    figures = {
        f"threads_{threads}": round(images_per_second(args.arch, args.size, args.channels, args.batch_size,
                                                      threads, args.seconds), 1)
        for threads in (1, 2)
    }
    print(json.dumps({"arch": args.arch, "size": args.size, "channels": args.channels,
                      "batch_size": args.batch_size, "train_images_per_second": figures}, indent=2))


if __name__ == "__main__":
    main()
