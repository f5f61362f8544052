"""Sweeps through Hydra's launchers for real: submitit (the cluster path) run locally."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import CONF_DIR

ROOT = CONF_DIR.parent


def test_the_slurm_launcher_config_extends_submitit_slurm():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.cpus_per_task == 2 and launcher.timeout_min == 120


@pytest.mark.slow
def test_a_two_job_multirun_through_submitit_local_finishes_both_runs(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the store exists before the jobs open it
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
         "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
         "model=mlp", "width=2", "epochs=2", "graph=off", "device=cpu", "num_threads=1",
         "seed=0,1", f"tracking.uri={uri}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("mlflow_tg").experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["mlflow_tg.sweep"] for r in runs}) == 1  # one sweep
    assert list((tmp_path / "multirun").rglob(".submitit"))  # submitit ran them
