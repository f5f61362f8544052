"""Image data sets as in-memory uint8 tensors with seeded train/val/test splits.

``digits`` (scikit-learn's shipped 8×8 digits) needs no download. ``mnist``, ``fashion_mnist``,
``cifar10`` and ``svhn`` are read by torchvision from their usual on-disk formats under ``root``.
Images stay uint8 in memory; each batch is converted, resized, augmented and normalised on the
fly, which keeps CIFAR-10 at 150 MB instead of 600 MB and costs little per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import DictConfig

from mlflow_tg.errors import ConfigError, InputError

MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]

# Files each torchvision data set needs under `root`, and whether flipping keeps labels valid.
EXPECTED_FILES = {
    "mnist": [f"MNIST/raw/{name}" for name in MNIST_FILES],
    "fashion_mnist": [f"FashionMNIST/raw/{name}" for name in MNIST_FILES],
    "cifar10": [f"cifar-10-batches-py/{name}" for name in CIFAR10_FILES],
    "svhn": ["train_32x32.mat", "test_32x32.mat"],
}
FLIP_SAFE = {"cifar10"}
# Data sets whose files torchvision reads with pickle.load: a pickle can run any code while it
# loads, so their MD5 check (data.verify_checksums) is also what keeps foreign files out.
PICKLED = {"cifar10"}
PICKLE_RISK = (
    "torchvision then unpickles them without any check, and loading a pickle can run any code "
    "it contains: use it only for files you made or trust"
)

log = logging.getLogger(__name__)
DATASETS = ["digits", *EXPECTED_FILES]


class DataNotFoundError(InputError, FileNotFoundError):
    """The files of a data set are not where the config says."""


@dataclass
class ImageSplit:
    """Images (N, C, H, W) as uint8 and their integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageData:
    """The three splits of a data set plus what models and batches need to know about it."""

    name: str
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    flip: bool = False

    @property
    def in_channels(self) -> int:
        """Number of image channels."""
        return self.train.images.shape[1]

    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one model input."""
        return (self.in_channels, self.image_size, self.image_size)


def load_data(cfg: DictConfig) -> ImageData:
    """Load the data set that ``cfg`` (the ``data`` config group) names."""
    if cfg.name == "digits":
        return load_digits(cfg)
    if cfg.name not in EXPECTED_FILES:
        raise ValueError(f"unknown data set {cfg.name!r}; choose one of {DATASETS}")
    train, test = read_torchvision(cfg)
    train, val = split_off(train, cfg.val_fraction, cfg.split_seed)
    require_images(cfg, train=train, val=val, test=test)
    mean, std = channel_stats(train.images)
    return ImageData(
        name=cfg.name,
        train=train,
        val=val,
        test=test,
        num_classes=int(torch.cat([train.labels, test.labels]).max()) + 1,
        image_size=cfg.image_size,
        mean=mean,
        std=std,
        augment=bool(cfg.augment),
        flip=cfg.name in FLIP_SAFE,
    )


def load_digits(cfg: DictConfig) -> ImageData:
    """scikit-learn's 1,797 8×8 digits, split train/val/test with ``split_seed``."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    everything = ImageSplit(torch.from_numpy(images), torch.from_numpy(digits.target).long())
    rest, test = split_off(everything, cfg.test_fraction, cfg.split_seed)
    train, val = split_off(rest, cfg.val_fraction / (1 - cfg.test_fraction), cfg.split_seed)
    require_images(cfg, train=train, val=val, test=test)
    mean, std = channel_stats(train.images)
    return ImageData("digits", train, val, test, 10, cfg.image_size, mean, std, cfg.augment)


def split_off(split: ImageSplit, fraction: float, seed: int) -> tuple[ImageSplit, ImageSplit]:
    """Split ``split`` into (rest, held-out) with a seeded permutation."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    n_held = round(len(split) * fraction)
    rest, held = order[n_held:], order[:n_held]
    return (
        ImageSplit(split.images[rest], split.labels[rest]),
        ImageSplit(split.images[held], split.labels[held]),
    )


def require_images(cfg: DictConfig, **splits: ImageSplit) -> None:
    """Refuse split fractions that leave a split without images (it could not be scored)."""
    empty = [name for name, split in splits.items() if len(split) == 0]
    if empty:
        keys = [key for key in ("val_fraction", "test_fraction") if key in cfg]
        given = " with ".join(f"data.{key}={cfg[key]!r}" for key in keys)
        total = sum(len(split) for split in splits.values())
        raise ConfigError(
            f"{given} is not allowed for {cfg.name}: it leaves the {empty[0]} split without "
            f"images (of {total}); every split needs at least one."
        )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, on the [0, 1] scale."""
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-6).tolist())


def read_torchvision(cfg: DictConfig) -> tuple[ImageSplit, ImageSplit]:
    """Read the official train and test splits through torchvision's own readers."""
    root = Path(cfg.root).expanduser()
    if not cfg.download:
        require_files(cfg.name, root)
    if not cfg.verify_checksums and cfg.name in PICKLED:
        log.warning(
            "data.verify_checksums=false: the %s files under %s are not checked against their "
            "official MD5 sums; %s.",
            cfg.name,
            root,
            PICKLE_RISK.replace("them", "the files", 1),
        )
    try:
        return tuple(read_split(cfg, root, train) for train in (True, False))
    except RuntimeError as error:  # torchvision's "not found or corrupted" (bad checksum)
        risk = f" ({PICKLE_RISK})" if cfg.name in PICKLED else ""
        raise DataNotFoundError(
            f"torchvision could not read {cfg.name} from {root}: {error} If the files are "
            f"yours and not the official ones, set data.verify_checksums=false{risk}."
        ) from error
    except OSError as error:  # a failed download
        raise DataNotFoundError(
            f"could not download {cfg.name} into {root} ({error}); copy the files there by hand "
            f"and run with data.download=false"
        ) from error


def require_files(name: str, root: Path) -> None:
    """Raise a clear error listing every file of ``name`` missing under ``root``."""
    missing = [path for path in EXPECTED_FILES[name] if not (root / path).is_file()]
    if missing:
        raise DataNotFoundError(
            f"data set {name!r} is not under root {str(root)!r}: missing {', '.join(missing)}. "
            f"Run once with data.download=true on a machine with internet access (torchvision "
            f"fetches them), or copy the files there, or point data.root (or MLFLOW_TG_DATA) at "
            f"the folder that has them."
        )


def read_split(cfg: DictConfig, root: Path, train: bool) -> ImageSplit:
    """One split of a torchvision data set as uint8 (N, C, H, W) images."""
    verify, download = bool(cfg.verify_checksums), bool(cfg.download)
    if cfg.name in ("mnist", "fashion_mnist"):
        cls = (
            torchvision.datasets.MNIST if cfg.name == "mnist" else torchvision.datasets.FashionMNIST
        )
        dataset = cls(str(root), train=train, download=download)
        return ImageSplit(dataset.data[:, None].clone(), dataset.targets.long().clone())
    if cfg.name == "cifar10":
        cls = torchvision.datasets.CIFAR10 if verify else UncheckedCIFAR10
        dataset = cls(str(root), train=train, download=download)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
        return ImageSplit(images, torch.tensor(dataset.targets, dtype=torch.long))
    cls = torchvision.datasets.SVHN if verify else UncheckedSVHN
    dataset = cls(str(root), split="train" if train else "test", download=download)
    return ImageSplit(torch.from_numpy(dataset.data), torch.from_numpy(dataset.labels).long())


class UncheckedCIFAR10(torchvision.datasets.CIFAR10):
    """CIFAR-10 reader that checks the files exist but not their MD5 sums."""

    train_list: ClassVar = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list: ClassVar = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta: ClassVar = {**torchvision.datasets.CIFAR10.meta, "md5": None}


class UncheckedSVHN(torchvision.datasets.SVHN):
    """SVHN reader that checks the files exist but not their MD5 sums."""

    split_list: ClassVar = {
        split: [url, filename, None]
        for split, (url, filename, _) in torchvision.datasets.SVHN.split_list.items()
    }


def prepare_batch(
    images: torch.Tensor,
    data: ImageData,
    train: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 (B, C, h, w) → normalised float (B, C, S, S), augmented for training batches."""
    x = images.float() / 255
    if x.shape[-1] != data.image_size:
        x = F.interpolate(x, size=data.image_size, mode="bilinear", align_corners=False)
    if train and data.augment:
        x = random_crop(x, padding=4, generator=generator)
        if data.flip:
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    mean = torch.tensor(data.mean, device=x.device)[:, None, None]
    std = torch.tensor(data.std, device=x.device)[:, None, None]
    return (x - mean) / std


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """Shift each image by up to ``padding`` pixels (zero fill), one offset per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy, dx = (torch.randint(0, 2 * padding + 1, (2, n), generator=generator)).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def batches(
    split: ImageSplit,
    data: ImageData,
    batch_size: int,
    device: torch.device,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield prepared (inputs, labels) batches; shuffled with ``generator`` when training."""
    order = torch.randperm(len(split), generator=generator) if train else torch.arange(len(split))
    for start in range(0, len(split), batch_size):
        index = order[start : start + batch_size]
        x = prepare_batch(split.images[index].to(device), data, train, generator)
        yield x, split.labels[index].to(device)
