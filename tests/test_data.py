"""Data loading: digits splits, and torchvision's formats read from files the tests write."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from mlflow_tg.errors import ConfigError
from mlflow_tg.train.data import DataNotFoundError, batches, load_data, prepare_batch, random_crop
from tests.conftest import compose_config


def data_cfg(name: str, root: Path | None = None, *extra: str):
    overrides = [f"data={name}", *extra]
    if root is not None:
        overrides.append(f"data.root={root}")
    return compose_config(overrides).data


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's IDX files: big-endian magic 2051 (images) and 2049 (labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()
    )
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes()
    )


def write_mnist(root: Path, name: str, rng: np.random.Generator) -> None:
    for prefix, n in (("train", 60), ("t10k", 20)):
        images = rng.integers(0, 256, (n, 28, 28))
        write_idx(root / name / "raw", prefix, images, np.arange(n) % 10)


def write_cifar10(root: Path, rng: np.random.Generator) -> None:
    """Pickled dicts with str keys, as in cifar-10-batches-py."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (12, 3072), dtype=np.uint8),
            "labels": [*range(10), 0, 1],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def write_svhn(root: Path, rng: np.random.Generator) -> None:
    """MATLAB files with X (32, 32, 3, N) and y (N, 1), label 10 meaning digit 0."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 30), ("test", 10)):
        labels = (np.arange(n) % 10 + 1).reshape(n, 1)
        images = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": images, "y": labels})


def test_digits_split_is_deterministic_and_disjoint():
    first, second = load_data(data_cfg("digits")), load_data(data_cfg("digits"))
    assert (len(first.train), len(first.val), len(first.test)) == (1078, 360, 359)
    assert torch.equal(first.test.images, second.test.images)
    assert first.input_shape() == (1, 32, 32) and first.num_classes == 10
    other = load_data(data_cfg("digits", None, "data.split_seed=1"))
    assert not torch.equal(other.test.images, first.test.images)
    labels = torch.cat([first.train.labels, first.val.labels, first.test.labels])
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.test_fraction=0.0001", "leaves the test split without images (of 1797)"),
        ("data.val_fraction=0.0001", "leaves the val split without images (of 1797)"),
    ],
)
def test_digits_fractions_that_leave_a_split_empty_are_refused(override: str, named: str):
    with pytest.raises(ConfigError) as error:
        load_data(data_cfg("digits", None, override))
    assert override in str(error.value)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_torchvision_validation_fraction_too_small_for_the_files_is_refused(tmp_path: Path):
    write_mnist(tmp_path, "MNIST", np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.001 is not allowed for mnist"):
        load_data(data_cfg("mnist", tmp_path, "data.val_fraction=0.001"))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_formats_load_through_torchvision(tmp_path: Path, name: str):
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    write_mnist(tmp_path, folder, np.random.default_rng(0))
    data = load_data(data_cfg(name, tmp_path))
    assert len(data.train) + len(data.val) == 60 and len(data.test) == 20
    assert data.input_shape() == (1, 28, 28) and data.num_classes == 10
    assert data.train.images.dtype == torch.uint8


def test_cifar10_loads_with_checksums_off_and_is_refused_with_them_on(tmp_path: Path):
    write_cifar10(tmp_path, np.random.default_rng(0))
    data = load_data(data_cfg("cifar10", tmp_path, "data.verify_checksums=false"))
    assert len(data.train) + len(data.val) == 60 and len(data.test) == 12
    assert data.input_shape() == (3, 32, 32) and data.flip and data.augment
    with pytest.raises(DataNotFoundError, match="verify_checksums=false"):
        load_data(data_cfg("cifar10", tmp_path))


def test_svhn_loads_and_maps_label_ten_to_zero(tmp_path: Path):
    write_svhn(tmp_path, np.random.default_rng(0))
    data = load_data(data_cfg("svhn", tmp_path, "data.verify_checksums=false"))
    assert len(data.test) == 10 and data.test.labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert not data.flip


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "svhn"])
def test_missing_files_error_names_files_root_and_remedy(tmp_path: Path, name: str):
    with pytest.raises(DataNotFoundError) as error:
        load_data(data_cfg(name, tmp_path / "nowhere"))
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message and "data.download=true" in message
    expected = {
        "mnist": "train-images-idx3-ubyte",
        "cifar10": "data_batch_1",
        "svhn": "train_32x32.mat",
    }
    assert expected.get(name, "t10k-labels-idx1-ubyte") in message


def test_batches_resize_normalise_and_cover_the_split():
    data = load_data(data_cfg("digits"))
    seen = 0
    for x, y in batches(data.val, data, 100, torch.device("cpu")):
        assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.float32
        seen += len(y)
    assert seen == len(data.val)
    x = prepare_batch(data.train.images, data, train=False)
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.15


def test_random_crop_shifts_each_image_within_padding():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    out = random_crop(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for image, original in zip(out, x, strict=True):
        nonzero = image[image != 0]
        # every kept pixel is a pixel of the original image, in the original order
        assert torch.isin(nonzero, original).all()
        assert torch.all(nonzero.diff() > 0)
