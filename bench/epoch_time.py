"""Seconds per training epoch of each model at width 16, on digits and on CIFAR-shaped data.

    python bench/epoch_time.py [--width 16] [--epochs 2] [--images 5000] [--device cpu]

CIFAR-shaped data is synthetic (random 3×32×32 uint8 images, 10 classes): it times the same code
path as CIFAR-10 without the download. The first epoch is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mlflow_tg.config import compose_config, resolve_device
from mlflow_tg.train.data import ImageData, ImageSplit, load_data
from mlflow_tg.train.loop import make_optimizer, train_one_epoch
from mlflow_tg.train.models import BUILDERS, build_model


def cifar_shaped(images: int) -> ImageData:
    """Random CIFAR-10-shaped data: 3×32×32 uint8 images, 10 classes, augmentation on."""
    generator = torch.Generator().manual_seed(0)
    split = ImageSplit(
        torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator),
        torch.randint(0, 10, (images,), generator=generator),
    )
    stats = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    return ImageData("cifar-shaped", split, split, split, 10, 32, *stats, augment=True, flip=True)


def seconds_per_epoch(model_name: str, data: ImageData, width: int, epochs: int, device) -> float:
    """Median time of ``epochs`` timed epochs after one warm-up epoch."""
    cfg = compose_config([f"model={model_name}", f"width={width}"])
    options = {k: v for k, v in cfg.model.items() if k != "name"}
    model = build_model(
        model_name, width, data.in_channels, data.image_size, data.num_classes, **options
    ).to(device)
    optimizer = make_optimizer(cfg, model.parameters())
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        train_one_epoch(model, data, optimizer, cfg.batch_size, device, generator, "bench")
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    datasets = {
        "digits": load_data(compose_config([]).data),
        "cifar-shaped": cifar_shaped(args.images),
    }
    print(f"device={device} threads={torch.get_num_threads()} width={args.width}")
    print(f"{'model':<8} {'data':<14} {'train images':>12} {'s/epoch':>9}")
    results = {}
    for model_name in BUILDERS:
        for data_name, data in datasets.items():
            seconds = seconds_per_epoch(model_name, data, args.width, args.epochs, device)
            results[f"{model_name}/{data_name}"] = round(seconds, 4)
            print(f"{model_name:<8} {data_name:<14} {len(data.train):>12} {seconds:>9.3f}")
    print(json.dumps({"device": str(device), "width": args.width, "seconds_per_epoch": results}))


if __name__ == "__main__":
    main()
