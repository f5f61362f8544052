"""Checks on a training config, made before any data is loaded or any MLflow run is created.

Hydra already rejects an unknown ``model=``/``data=``/``optimizer=`` choice with the list of
available ones; these checks cover values a typo would otherwise turn into a confusing failure
deep inside PyTorch or a silently useless run.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mlflow_tg.errors import ConfigError

# The project's configs live beside the package (the package is installed editable).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
LR_SCHEDULES = ("constant", "cosine")
# Keys that change where or how a run is recorded, not what is trained.
NOT_TRAINING_KEYS = (
    "seed",
    "tracking",
    "graph",
    "device",
    "num_threads",
    "data.root",
    "data.download",
    "data.verify_checksums",
)


def compose_config(overrides: list[str] | None = None, name: str = "config") -> DictConfig:
    """Compose ``conf/<name>.yaml`` with overrides, as ``train.py`` would, outside a Hydra app."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def is_whole_number(value: Any) -> bool:
    """True for ints, not bools (``True`` is an int in Python, not a width)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad value and what is allowed."""
    for key, minimum in (("width", 1), ("epochs", 1), ("batch_size", 1)):
        value = cfg.get(key)
        if not is_whole_number(value) or value < minimum:
            raise ConfigError(
                f"{key}={value!r} is not allowed: {key} must be a whole number ≥ {minimum} "
                f"(for example {key}={max(minimum, 16)})."
            )
    lr = cfg.optimizer.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise ConfigError(
            f"optimizer.lr={lr!r} is not allowed: the learning rate must be a number > 0 "
            "(for example optimizer.lr=0.05)."
        )
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"lr_schedule={cfg.lr_schedule!r} is not allowed: choose one of {list(LR_SCHEDULES)}."
        )
    check_device(str(cfg.device))
    if cfg.graph.enabled:
        check_graph(cfg.graph)


def check_graph(graph: DictConfig) -> None:
    """Reject graph-capture options that would fail mid-run or silently measure nothing."""
    from mlflow_tg.graph.centrality import CENTRALITIES

    for key, minimum in (("every_n_epochs", 1), ("pivots", 1), ("sources", 1), ("threads", 0)):
        value = graph.get(key)
        if not is_whole_number(value) or value < minimum:
            raise ConfigError(
                f"graph.{key}={value!r} is not allowed: it must be a whole number ≥ {minimum}."
            )
    chosen = graph.centralities
    unknown = [name for name in chosen if name not in CENTRALITIES]
    if unknown or len(chosen) == 0:
        raise ConfigError(
            f"graph.centralities={list(chosen)!r} is not allowed: choose one or more of "
            f"{list(CENTRALITIES)} (or graph.enabled=false to capture nothing)."
        )


def check_device(device: str) -> None:
    """Reject a device string torch does not know, or one this machine does not have."""
    if not DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(
            f"device={device!r} is not allowed: use auto (CUDA when available, else CPU), cpu, "
            "cuda, cuda:N or mps."
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} was asked for but this machine has no CUDA device: use "
            "device=auto or device=cpu."
        )
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r} does not exist: this machine has CUDA devices "
            f"0..{torch.cuda.device_count() - 1}."
        )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' was asked for but MPS is not available: use device=auto.")


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as ``{"dotted.key": value}`` (lists kept as values)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def config_id(cfg: DictConfig) -> str:
    """A short hash of everything that shapes training except the seed: seed-twins share it."""
    training = {
        key: value
        for key, value in flatten(cfg).items()
        if not any(key == skip or key.startswith(f"{skip}.") for skip in NOT_TRAINING_KEYS)
    }
    return hashlib.sha1(json.dumps(training, sort_keys=True).encode()).hexdigest()[:12]
