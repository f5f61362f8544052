"""``train.py`` as users run it: the README's main command, and a multirun."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import CONF_DIR

ROOT = CONF_DIR.parent


def make_recipe(target: str) -> str:
    """The command a Makefile target runs, with ``$(PY)`` standing for the venv's python."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(rf"^{target}:.*\n\t(.+)$", makefile, re.MULTILINE).group(1)
    return recipe.replace("$(PY) ", "")


def runs_in(folder: Path, experiment: str = "mlflow_tg") -> list:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id])


@pytest.mark.slow
def test_readme_main_command_runs_end_to_end_on_the_embedded_default(tmp_path: Path):
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    command = make_recipe("run")
    assert command == "train.py model=resnet width=16"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *command.split()[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, (run,) = runs_in(tmp_path)
    assert run.info.status == "FINISHED" and run.info.run_name == "resnet-w16-s0"
    assert run.data.tags["mlflow_tg.overrides"] == "model=resnet width=16"
    for key in ("val_acc", "tg.eigenvector/mean", "tg.strength/depth3.gini"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(11)), key
    figure = {a.path for a in client.list_artifacts(run.info.run_id, "graph")}
    assert "graph/dynamics.png" in figure
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, ".hydra")}
    assert artifacts == {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}
    assert (tmp_path / "mlartifacts").is_dir()


@pytest.mark.slow
def test_multirun_groups_jobs_and_carries_on_after_a_diverged_one(tmp_path: Path):
    overrides = ["model=mlp", "width=2", "epochs=2", "graph=off", "optimizer.lr=1e6,0.05"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, runs = runs_in(tmp_path)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    by_lr = {r.data.params["optimizer.lr"]: r for r in runs}
    assert by_lr["1000000.0"].data.tags["diverged"] == "true"
    assert "diverged" not in by_lr["0.05"].data.tags
    sweeps = {r.data.tags["mlflow_tg.sweep"] for r in runs}
    assert len(sweeps) == 1 and sweeps.pop().startswith("multirun/")
    assert {r.data.tags["mlflow_tg.sweep_job"] for r in runs} == {"0", "1"}


def imported_by(*modules: str) -> set[str]:
    """Every module a fresh interpreter imports to import ``modules``."""
    code = f"import sys, {', '.join(modules)}; print(' '.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return set(result.stdout.split())


def test_mlflow_tg_predict_imports_no_torch_and_on_its_own_paths_not_even_mlflow():
    """``mlflow-tg predict`` runs per run of a sweep: no torch (mlflow_tg.config imports it).

    The modules of each of its paths; the paths themselves are run end to end in
    tests/test_serving.py.
    """
    client_path = imported_by(
        "mlflow_tg.serve.cli", "mlflow_tg.predictor.model", "mlflow_tg.predictor.registry",
        "mlflow_tg.predictor.scoring", "mlflow_tg.tracking.runs", "mlflow_tg.predictor.endpoint",
    )  # fmt: skip
    assert "mlflow" in client_path and "pandas" in client_path
    assert not {"torch", "torchvision", "mlflow_tg.config", "sklearn"} & client_path
    sqlite_path = imported_by(
        "mlflow_tg.serve.cli", "mlflow_tg.tracking.sqlite", "mlflow_tg.predictor.answering",
        "catboost", "yaml",
    )  # fmt: skip
    assert not {"mlflow", "torch", "mlflow_tg.config", "sklearn"} & sqlite_path
    http_path = imported_by("mlflow_tg.serve.cli", "mlflow_tg.serve.rest", "pyarrow.parquet")
    assert not {"mlflow", "pandas", "polars", "torch"} & http_path


def test_the_command_reports_bad_input_in_one_paragraph_and_its_own_bugs_in_full():
    from mlflow_tg.serve.cli import refusal_message
    from mlflow_tg.tracking.records import RunNotFoundError, StoreError

    assert refusal_message(RunNotFoundError("run 'x' is not there")) == "run 'x' is not there"
    assert refusal_message(StoreError("locked")) == "locked"
    assert refusal_message(KeyError("run")) is None  # a bug: its traceback, not a paragraph
    assert refusal_message(IndexError(0)) is None


@pytest.mark.parametrize(
    ("uri", "command"),
    [
        ("sqlite:///mlflow.db", "python -m mlflow_tg.predictor,"),
        ("http://127.0.0.1:5000", "python -m mlflow_tg.predictor tracking=server,"),
        ("http://host:5000", "python -m mlflow_tg.predictor tracking.uri=http://host:5000,"),
    ],
)
def test_a_missing_champion_names_the_command_that_fits_one_in_that_store(uri, command):
    from mlflow_tg.tracking.records import no_version

    message = str(no_version(uri, "tg-performance-predictor", "champion"))
    assert command in message and "--endpoint" in message


def test_a_missing_champion_hides_the_stores_password():
    from mlflow_tg.tracking.records import no_version

    uri = "postgresql+psycopg2://user:secret@127.0.0.1/mlflow_tg"
    for held in (None, {"other": ["champion"]}):
        message = str(no_version(uri, "tg-performance-predictor", "champion", held))
        assert "secret" not in message and "postgresql+psycopg2://user:***@127.0.0.1" in message
