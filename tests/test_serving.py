"""A real ``mlflow models serve`` of the champion, and ``mlflow-tg predict`` against it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import polars as pl
import pytest
import requests
from mlflow import MlflowClient

from mlflow_tg.job import train
from mlflow_tg.keys import HISTORY as HISTORY_ARTIFACT
from mlflow_tg.predictor.features import run_features
from mlflow_tg.predictor.scoring import model_columns, model_row, predict_in_process
from mlflow_tg.serve.client import EndpointError, ask_endpoint, request_body
from mlflow_tg.tracking.runs import load_run
from tests.conftest import compose_config
from tests.servers import free_port, running_server

NAME = "tg-performance-predictor"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def endpoint(champion, population, tmp_path_factory):
    """The champion served by MLflow's scoring server on a free loopback port."""
    port = free_port()
    env = os.environ | {
        "MLFLOW_TRACKING_URI": population["uri"],
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # it execs the venv's uvicorn
    }
    arguments = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server(arguments, f"http://127.0.0.1:{port}/ping", log, env):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def run_id(population) -> str:
    """A finished lenet run of the population."""
    client = MlflowClient(population["uri"])
    experiment = client.get_experiment_by_name("population").experiment_id
    query = (
        "params.`model.name` = 'lenet' and params.seed = '0' and params.width = '3' "
        "and params.`optimizer.lr` = '0.05'"
    )
    (run,) = client.search_runs([experiment], query)
    return run.info.run_id


def features_of(population, run_id: str) -> dict:
    run = load_run(MlflowClient(population["uri"]), run_id)
    return run_features(run.history, run.params, 2, "graph+curve+hparams")


def catboost_prediction(population, version: str, features: dict) -> float:
    """CatBoost's own prediction for the run, a column it lacks NaN (a category 'none')."""
    mlflow.set_tracking_uri(population["uri"])
    model = mlflow.catboost.load_model(f"models:/{NAME}/{version}")
    categories = {"model", "optimizer", "lr_schedule", "data"}
    row = {
        column: features.get(column, "none" if column in categories else math.nan)
        for column in model.feature_names_
    }
    return float(model.predict(pd.DataFrame([row]))[0])


def invocations(endpoint: str, body: str) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    return requests.post(f"{endpoint}/invocations", data=body, headers=headers, timeout=30)


def test_endpoint_predicts_what_the_model_predicts_in_process(endpoint, population, run_id):
    features = features_of(population, run_id)
    served = ask_endpoint(endpoint, features)
    assert served == pytest.approx(predict_in_process(f"models:/{NAME}@champion", features))
    assert -0.5 < served < 1.5


def test_a_request_missing_features_gets_a_400_naming_them(endpoint, population, run_id):
    features = features_of(population, run_id)
    first, second = model_columns(f"models:/{NAME}@champion")[:2]
    del features[first], features[second]
    response = invocations(endpoint, json.dumps(request_body(features)))
    assert response.status_code == 400
    assert first in response.text and second in response.text
    with pytest.raises(EndpointError, match="HTTP 400"):
        ask_endpoint(endpoint, features)


def test_a_string_in_a_number_column_gets_a_400(endpoint, population, run_id):
    column = model_columns(f"models:/{NAME}@champion")[0]  # a graph or curve number
    features = features_of(population, run_id) | {column: "tiny"}
    response = invocations(endpoint, json.dumps(request_body(features)))
    assert response.status_code == 400 and column in response.text


@pytest.mark.parametrize("body", ["", "{}", "not json"])
def test_an_empty_or_malformed_body_gets_a_4xx(endpoint, body):
    assert 400 <= invocations(endpoint, body).status_code < 500


def mlflow_tg(*arguments: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run(
        [str(BIN / "mlflow-tg"), *arguments], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("through_endpoint", [True, False])
def test_cli_predicts_and_logs_to_the_run(endpoint, population, run_id, champion, through_endpoint):
    extra = ["--endpoint", endpoint] if through_endpoint else []
    result = mlflow_tg("predict", "--run-id", run_id, "--tracking-uri", population["uri"], *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run {run_id}: predicted final test accuracy" in result.stdout
    client = MlflowClient(population["uri"])
    (logged,) = [m for m in client.get_metric_history(run_id, "predicted/test_acc")][-1:]
    expected = catboost_prediction(population, champion["version"], features_of(population, run_id))
    assert logged.step == 2 and logged.value == pytest.approx(expected)
    assert f"{logged.value:.4f}" in result.stdout
    source = f"via {endpoint}" if through_endpoint else "in process"
    tag = client.get_run(run_id).data.tags["mlflow_tg.predicted_by"]
    assert tag == f"models:/{NAME}/{champion['version']} {source}"


def live_copy(client: MlflowClient, run_id: str, epochs: int, drop: set[str] = frozenset()) -> str:
    """A RUNNING run with the params of ``run_id`` and its first epochs, without ``drop``."""
    finished = load_run(client, run_id)
    experiment = client.get_experiment_by_name("population").experiment_id
    live = client.create_run(experiment, run_name="still-training").info.run_id
    for key, value in finished.params.items():
        client.log_param(live, key, value)
    rows = [{k: v for k, v in row.items() if k not in drop} for row in finished.history[:epochs]]
    with tempfile.TemporaryDirectory() as tmp:
        pl.DataFrame(rows).write_parquet(Path(tmp) / HISTORY_ARTIFACT)
        client.log_artifact(live, str(Path(tmp) / HISTORY_ARTIFACT))
    return live


def metric_of(column: str) -> str:
    """The logged metric a graph feature column comes from (``tg.x.gini@2`` → ``tg.x.gini``)."""
    return column.split("@")[0] if "@" in column else column.rsplit(".", 1)[0]


def test_a_run_lacking_model_columns_gets_one_prediction_by_both_paths(
    endpoint, population, run_id, champion
):
    client = MlflowClient(population["uri"])
    columns = model_columns(f"models:/{NAME}/{champion['version']}")
    dropped = set(sorted({metric_of(c) for c in columns if c.startswith("tg.")})[:2])
    live = live_copy(client, run_id, 3, dropped)
    run = load_run(client, live)
    features = run_features(run.history, run.params, 2, "graph+curve+hparams")
    lacking = [c for c in columns if c not in features]
    command = ("predict", "--run-id", live, "--tracking-uri", population["uri"])
    try:
        for extra in (["--endpoint", endpoint], []):
            result = mlflow_tg(*command, *extra)
            assert result.returncode == 0, result.stderr[-3000:]
            assert f"the run lacks {len(lacking)} of the model's {len(columns)}" in result.stderr
        served, local = (m.value for m in client.get_metric_history(live, "predicted/test_acc"))
    finally:
        client.set_terminated(live)
    assert lacking and served == pytest.approx(local)
    assert local == pytest.approx(catboost_prediction(population, champion["version"], features))


def test_model_row_fills_what_the_run_lacks_and_says_so(capsys):
    row = model_row({"val_acc@2": 0.5, "extra": 1.0}, ["val_acc@2", "tg.x@0", "model"])
    assert list(row) == ["val_acc@2", "tg.x@0", "model"]
    assert row["val_acc@2"] == 0.5 and math.isnan(row["tg.x@0"]) and row["model"] == "none"
    warning = capsys.readouterr().err
    assert "the run lacks 2 of the model's 3 feature columns (tg.x@0, model)" in warning


def test_an_answer_without_predictions_is_an_endpoint_error(monkeypatch):
    class Answer:
        status_code, text = 200, '{"result": [0.5]}'

        def json(self):
            return json.loads(self.text)

    monkeypatch.setattr(requests, "post", lambda *args, **kwargs: Answer())
    with pytest.raises(EndpointError, match=r'without a prediction .*\{"result": \[0.5\]\}'):
        ask_endpoint("http://127.0.0.1:1", {"val_acc@2": 0.5})


def test_cli_predicts_a_run_that_is_still_running(population, run_id, champion):
    client = MlflowClient(population["uri"])
    live = live_copy(client, run_id, 3)
    try:
        result = mlflow_tg("predict", "--run-id", live, "--tracking-uri", population["uri"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert client.get_run(live).info.status == "RUNNING"
        assert "predicted/test_acc" in client.get_run(live).data.metrics
    finally:
        client.set_terminated(live)


def test_cli_refuses_a_run_with_too_few_epochs(population, champion, tmp_path):
    short = train(
        compose_config(
            [
                "model=mlp", "width=2", "epochs=1", "device=cpu", "graph.threads=1",
                f"tracking.uri={population['uri']}",
                f"tracking.artifact_root={population['artifacts']}",
                "tracking.experiment=short-runs",
            ]
        )
    )  # fmt: skip
    result = mlflow_tg("predict", "--run-id", short["run_id"], "--tracking-uri", population["uri"])
    assert result.returncode == 2
    assert "has 2 epochs logged (0, 1) but the predictor needs epochs 0..2" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_names_an_unknown_run_and_a_missing_model(population, tmp_path):
    result = mlflow_tg("predict", "--run-id", "nope", "--tracking-uri", population["uri"])
    assert result.returncode == 2 and "run 'nope' is not in the tracking store" in result.stderr
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    result = mlflow_tg("predict", "--run-id", "nope", "--tracking-uri", empty)
    assert result.returncode == 2 and "has no model 'tg-performance-predictor'" in result.stderr


def test_cli_names_a_version_without_its_feature_tags(population, run_id, tmp_path):
    client = MlflowClient(population["uri"])
    client.create_registered_model("untagged")
    version = client.create_model_version("untagged", str(tmp_path))
    client.set_registered_model_alias("untagged", "champion", version.version)
    command = ("predict", "--run-id", run_id, "--tracking-uri", population["uri"])
    result = mlflow_tg(*command, "--model", "untagged")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model 'untagged' version 1 has no usable feature spec" in result.stderr
