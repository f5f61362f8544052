"""Shared fixtures: the real config composed once, then shrunk for fast offline tests."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import DictConfig, open_dict

from mlflow_tg.config import CONF_DIR, compose_config
from tests.servers import free_port, running_server

__all__ = ["CONF_DIR", "all_runs", "compose_config"]


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, its tables made once per session.

    MLflow's migrations of a new store take 3-5 s on this machine; copying this one, 0.07 s.
    """
    path = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path: Path, empty_store: Path) -> str:
    """A fresh SQLite MLflow store in a temporary folder (a copy of ``empty_store``)."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
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


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """A real ``mlflow server`` on a free loopback port, stopped after the tests."""
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    arguments = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    health = f"http://127.0.0.1:{port}/health"
    with running_server(arguments, health, folder / "server.log"):
        yield f"http://127.0.0.1:{port}"


POPULATION_GRID = {
    "model": ["mlp", "lenet"],
    "width": [2, 3],
    "optimizer.lr": [0.003, 0.05, 0.3],
    "seed": [0, 1],
}


@pytest.fixture(scope="session")
def population(tmp_path_factory) -> dict[str, str]:
    """A small real population: 24 tiny networks trained 4 epochs on digits, graph captured.

    Half of them learn (final accuracy 0.7-0.85), half stay near chance: the two clusters of
    a real sweep.
    """
    import itertools

    from mlflow_tg.job import train

    folder = tmp_path_factory.mktemp("population")
    store = {"uri": f"sqlite:///{folder / 'mlflow.db'}", "artifacts": str(folder / "artifacts")}
    for values in itertools.product(*POPULATION_GRID.values()):
        choices = [f"{key}={value}" for key, value in zip(POPULATION_GRID, values, strict=True)]
        train(store_job(store, "population", *choices))
    return store


def store_job(store: dict[str, str], experiment: str, *overrides: str) -> DictConfig:
    """A tiny training job (4 epochs, CPU) logging to a test store's experiment."""
    return compose_config(
        [
            "epochs=4",
            "device=cpu",
            "batch_size=32",
            "graph.threads=1",
            "graph.node_tables=false",
            f"tracking.uri={store['uri']}",
            f"tracking.artifact_root={store['artifacts']}",
            f"tracking.experiment={experiment}",
            *overrides,
        ]
    )


def predictor_config(store: dict[str, str], *overrides: str) -> DictConfig:
    """The real predictor config, shrunk: k=2 (windows 1..3), two small CatBoost fits, the store.

    The registered set is fixed (not ``auto``), so that tests know which metrics it reads.
    """
    return compose_config(
        [
            "k=2",
            "feature_sets=graph+curve+hparams",
            "ks=[1,2,3]",
            "catboost.iterations=60",
            "catboost.thread_count=1",
            "ensemble=2",
            "holdout_fraction=0.4",
            f"tracking.uri={store['uri']}",
            f"tracking.artifact_root={store['artifacts']}",
            *overrides,
        ],
        name="predictor",
    )


@pytest.fixture(scope="session")
def champion(population) -> dict:
    """The predictor fitted once on the population and registered as champion."""
    from mlflow_tg.predictor.job import fit_predictor

    return fit_predictor(predictor_config(population))


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the machine's cores are shared with other processes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
