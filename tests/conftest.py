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


def free_port() -> int:
    """A TCP port nobody listens on right now, on loopback."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(url: str, process, timeout_s: float = 120.0) -> None:
    """Poll ``url`` until it answers 200; fail with the process's output if it dies."""
    import time

    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {process.stdout.read()}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """A real ``mlflow server`` on a free loopback port, stopped after the tests."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination", str(folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
