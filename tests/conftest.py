"""Shared fixtures: the real config composed once, then shrunk for fast offline tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import DictConfig, open_dict

from mlflow_tg.config import CONF_DIR, compose_config

__all__ = ["CONF_DIR", "all_runs", "compose_config"]


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in a temporary folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def make_cfg(tmp_path: Path, tracking_uri: str) -> Callable[..., DictConfig]:
    """Compose the real config with overrides, shrunk: 1 epoch, tiny width, CPU, tmp store."""

    def make(*overrides: str) -> DictConfig:
        shrink = [
            "epochs=1",
            "width=2",
            "device=cpu",
            "batch_size=256",
            f"tracking.uri={tracking_uri}",
            f"tracking.artifact_root={tmp_path / 'artifacts'}",
            "tracking.experiment=tests",
        ]
        cfg = compose_config([*shrink, *overrides])
        with open_dict(cfg):
            cfg.graph.threads = 1
        return cfg

    return make


@pytest.fixture
def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri)


def all_runs(client: MlflowClient, experiment: str = "tests") -> list:
    """Every run of an experiment in the store, newest first."""
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])
