"""The training config: its typed schema, its composition and checks, and what a run logs of it.

``conf/`` holds the YAML options of each group; ``schema.py`` types every one of them (Hydra's
ConfigStore, registered when this package is imported) and checks its ranges; ``checks.py``
refuses what a schema cannot see (this machine's devices and drivers, a model too deep for the
image size); ``build.py`` builds the model and the optimizer from their ``_target_``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from mlflow_tg.config.build import build_from_config
from mlflow_tg.config.checks import check_config, translate_error
from mlflow_tg.config.schema import (
    Centrality,
    Config,
    LrSchedule,
    is_whole_number,
    register_schemas,
)
from mlflow_tg.errors import ConfigError

__all__ = [
    "CONF_DIR",
    "Centrality",
    "Config",
    "ConfigError",
    "LrSchedule",
    "build_from_config",
    "check_config",
    "compose_config",
    "config_id",
    "flatten",
    "is_whole_number",
    "resolve_device",
    "translate_error",
]

# The project's configs live beside the package (the package is installed editable).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Keys that change where or how a run is recorded, not what is trained.
NOT_TRAINING_KEYS = (
    "seed",
    "tracking",
    "graph",
    "predict",
    "prune",
    "device",
    "num_threads",
    "data.root",
    "data.download",
    "data.verify_checksums",
)

register_schemas()


def compose_config(overrides: list[str] | None = None, name: str = "config") -> DictConfig:
    """Compose ``conf/<name>.yaml`` with overrides, as ``train.py`` would, outside a Hydra app.

    A value the schema refuses raises the same one-paragraph ConfigError as ``train.py`` prints.
    """
    overrides = overrides or []
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=name, overrides=overrides)
    except ConfigCompositionException as error:
        translated = translate_error(error, overrides)
        if translated is None:
            raise
        raise translated from None


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as ``{"dotted.key": value}`` (lists kept as values, enums as names).

    Hydra's own keys (``_target_``, ``_partial_``) say how to build a node, not what is
    trained, and are left out.
    """
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not is_hydra_key(key):
                    walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return flat


def is_hydra_key(key: str) -> bool:
    """``_target_``, ``_partial_``…: keys that tell Hydra how to build a node."""
    return len(key) > 2 and key.startswith("_") and key.endswith("_")


def config_id(cfg: DictConfig) -> str:
    """A short hash of everything that shapes training except the seed: seed-twins share it."""
    training = {
        key: value
        for key, value in flatten(cfg).items()
        if not any(key == skip or key.startswith(f"{skip}.") for skip in NOT_TRAINING_KEYS)
    }
    return hashlib.sha1(json.dumps(training, sort_keys=True).encode()).hexdigest()[:12]
