"""How close imgpipe's training loop runs to the compute bound, on one CPU thread. Prints JSON.

    python bench/train_loop.py [--cnn-images 2048] [--resnet-images 384] [--epochs 4] [--rounds 3]
                               [--archs simple_cnn resnet18] [--no-feature-extract]

For simple_cnn and resnet18 at 40x40x1 (batch 32, Adam), in one process:

- loop_none / loop_light: images/s of `imgpipe.training.engine.train_model` itself, with
  augment none and light. Each epoch's time includes what the engine does every epoch:
  the resume checkpoint (model, optimizer, random states) written, flushed to disk and
  renamed, the best epoch's checkpoint when it improves, and a validation pass over one
  batch of images (kept small, as its cost belongs to the data, not to the loop). The
  first epoch is left out (warm-up).
- compute_bound: the same model, batch size and optimizer fed one preloaded, normalised
  batch of the same images: forward, loss, backward, step, nothing else.
- imagefolder: torchvision's ImageFolder + DataLoader (num_workers=0) over the same PNGs,
  decoding and normalising every image every epoch, as hand-written notebooks do.

This machine's speed drifts by 10-20% from minute to minute, so the four are measured in
turn, `--rounds` times, and each figure is the median. Each is printed with its ratio to
the compute bound. Then the feature_extract
speedup: resnet18 trained with the backbone frozen (its features computed once) against
finetune, same epochs and images, wall time of the whole `train_model` call.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgpipe.config.schema import load_schema
from imgpipe.config.validation import validate_config
from imgpipe.models.networks import build_model
from imgpipe.training.engine import TrainingJob, train_model

REPO = Path(__file__).resolve().parents[1]
SIZE = 40
BATCH = 32
IMAGE = {"size": SIZE, "color": "grayscale", "resize": "stretch", "pad_color": "black"}


def write_digit_pngs(root: Path, n_train: int) -> Path:
    """sklearn's digits scaled to 40x40 PNGs: class folders (for ImageFolder) and a split manifest."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n_val = BATCH
    rows = []
    for index in range(n_train + n_val):
        source = index % len(digits.images)
        array = (digits.images[source] * 255 / 16).astype(np.uint8)
        label = str(digits.target[source])
        split = "train" if index < n_train else "val"
        path = root / split / label / f"{index:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).resize((SIZE, SIZE), Image.BILINEAR).save(path)
        rows.append(f"{path},{label},{split}")
    manifest = root / "manifest.csv"
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return manifest


def settings_for(arch: str, epochs: int, **overrides) -> dict:
    config = {"experiment": "bench", "classes": {"a": {"sources": [{"digits": 1}]}, "b": {"sources": [{"digits": 2}]}},
              "models": {"m": {"arch": arch, "epochs": epochs, "batch_size": BATCH, "optimizer": "adam",
                               "device": "cpu", **overrides}}}
    return validate_config(config, load_schema(REPO / "workflow/schemas/config.schema.yaml"))["models"]["m"]


def engine_images_per_second(arch: str, manifest: Path, n_train: int, epochs: int, work: Path, **overrides) -> float:
    job = TrainingJob(f"{arch}-{overrides}", settings_for(arch, epochs, **overrides), IMAGE, manifest,
                      work / "resume", work / "model.pt", torch.device("cpu"))
    history, _ = train_model(job)
    return n_train * (epochs - 1) / history["seconds"].iloc[1:].sum()


def compute_bound(arch: str, data: Path, n_train: int, epochs: int) -> float:
    torch.manual_seed(0)
    model = build_model(arch, 10, 1, SIZE).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    paths = sorted((data / "train").rglob("*.png"))[:BATCH]
    images = torch.stack([torch.from_numpy(np.array(Image.open(path))) for path in paths]).unsqueeze(1)
    images = (images.float() / 255 - 0.5) / 0.25
    labels = torch.tensor([int(path.parent.name) for path in paths])
    steps = -(-n_train // BATCH)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    for _ in range(steps):  # warm-up, as the first epoch of the others
        step()
    started = time.perf_counter()
    for _ in range(steps * (epochs - 1)):
        step()
    return steps * BATCH * (epochs - 1) / (time.perf_counter() - started)


def imagefolder_images_per_second(arch: str, root: Path, epochs: int) -> float:
    from torchvision import datasets, transforms

    dataset = datasets.ImageFolder(root / "train", transform=transforms.Compose([
        transforms.Grayscale(1), transforms.ToTensor(), transforms.Normalize([0.5], [0.25])]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    model = build_model(arch, len(dataset.classes), 1, SIZE).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    seconds = 0.0
    for epoch in range(epochs):
        started = time.perf_counter()
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        if epoch > 0:
            seconds += time.perf_counter() - started
    return len(dataset) * (epochs - 1) / seconds


def measure(arch: str, n_train: int, epochs: int, rounds: int, scratch: Path) -> dict:
    data = scratch / f"{arch}-data"
    manifest = write_digit_pngs(data, n_train)
    samples: dict[str, list[float]] = {"compute_bound": [], "loop_none": [], "loop_light": [], "imagefolder": []}
    for round_index in range(rounds):
        samples["compute_bound"].append(compute_bound(arch, data, n_train, epochs))
        samples["loop_none"].append(engine_images_per_second(arch, manifest, n_train, epochs,
                                                             scratch / f"{arch}-none-{round_index}"))
        samples["loop_light"].append(engine_images_per_second(arch, manifest, n_train, epochs,
                                                              scratch / f"{arch}-light-{round_index}", augment="light"))
        samples["imagefolder"].append(imagefolder_images_per_second(arch, data, epochs))
    figures = {key: float(np.median(values)) for key, values in samples.items()}
    bound = figures["compute_bound"]
    result = {"train_images": n_train, "epochs_timed": epochs - 1, "rounds": rounds}
    result |= {key: round(value, 1) for key, value in figures.items()}
    for key in ("loop_none", "loop_light", "imagefolder"):
        result[f"{key}_to_bound"] = round(figures[key] / bound, 3)
    result["loop_none_to_imagefolder"] = round(figures["loop_none"] / figures["imagefolder"], 2)
    result["samples"] = {key: [round(value, 1) for value in values] for key, values in samples.items()}
    return result


def feature_extract_speedup(n_train: int, epochs: int, scratch: Path) -> dict:
    manifest = write_digit_pngs(scratch / "fe-data", n_train)
    seconds = {}
    for strategy in ("finetune", "feature_extract"):
        job = TrainingJob(strategy, settings_for("resnet18", epochs, strategy=strategy), IMAGE, manifest,
                          scratch / strategy / "resume", scratch / strategy / "model.pt", torch.device("cpu"))
        started = time.perf_counter()
        train_model(job)
        seconds[strategy] = time.perf_counter() - started
    return {"train_images": n_train, "epochs": epochs,
            "finetune_seconds": round(seconds["finetune"], 1),
            "feature_extract_seconds": round(seconds["feature_extract"], 1),
            "speedup": round(seconds["finetune"] / seconds["feature_extract"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cnn-images", type=int, default=2048)
    parser.add_argument("--resnet-images", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=4, help="per measurement; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each figure; the median is printed")
    parser.add_argument("--archs", nargs="+", default=["simple_cnn", "resnet18"], choices=["simple_cnn", "resnet18"])
    parser.add_argument("--no-feature-extract", action="store_true", help="skip the feature_extract comparison")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="imgpipe-train-loop-") as scratch:
        scratch = Path(scratch)
        figures = {
            "command": "python " + " ".join(sys.argv),
            "threads": 1,
            "machine": platform.machine(),
            "torch": torch.__version__,
            "input": f"{SIZE}x{SIZE}x1, batch {BATCH}, adam",
            "images_per_second": {
                arch: measure(arch, args.cnn_images if arch == "simple_cnn" else args.resnet_images, args.epochs,
                              args.rounds, scratch)
                for arch in args.archs
            },
        }
        if not args.no_feature_extract:
            figures["feature_extract_vs_finetune_resnet18"] = feature_extract_speedup(args.resnet_images, args.epochs,
                                                                                       scratch)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
