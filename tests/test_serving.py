"""A real ``mlflow models serve`` of the champion: any HTTP client, and ``mlflow-tg predict``.

The served model takes runs (rows per run and epoch: metrics and params) and answers one row per
run; the in-process model answers the same; a client with nothing but ``requests`` and pandas
builds the request from MLflow's REST API.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import polars as pl
import pytest
import requests
from mlflow import MlflowClient
from mlflow.models import infer_signature

from mlflow_tg import keys
from mlflow_tg.job import train
from mlflow_tg.keys import HISTORY as HISTORY_ARTIFACT
from mlflow_tg.predictor.answering import model_input
from mlflow_tg.predictor.endpoint import EndpointError, ask_endpoint, request_body
from mlflow_tg.predictor.scoring import load_run_predictor
from mlflow_tg.tracking.runs import load_run
from tests.conftest import compose_config
from tests.servers import free_port, running_server

NAME = "tg-performance-predictor"
BIN = Path(sys.executable).parent
PREDICTED = ("predicted/test_acc", "predicted/test_acc_low", "predicted/test_acc_high")
ANSWER = ("predicted_test_acc", "predicted_test_acc_low", "predicted_test_acc_high")


@pytest.fixture(scope="module")
def endpoint(champion, population, tmp_path_factory):
    """The champion served by MLflow's scoring server on a free loopback port (make serve)."""
    port = free_port()
    arguments = [str(BIN / "mlflow-tg"), "serve", "--tracking-uri", population["uri"],
                 "--port", str(port)]  # fmt: skip
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server(arguments, f"http://127.0.0.1:{port}/ping", log):
        assert f"serving models:/{NAME}/{champion['version']} ({NAME}@champion)" in log.read_text()
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tracking(population, tmp_path_factory):
    """A real ``mlflow server`` on the population's store (its artifacts on local disk)."""
    port = free_port()
    arguments = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", population["uri"],
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("tracking") / "server.log"
    with running_server(arguments, f"http://127.0.0.1:{port}/health", log):
        yield f"http://127.0.0.1:{port}"


def population_run(population, query: str) -> str:
    client = MlflowClient(population["uri"])
    experiment = client.get_experiment_by_name("population").experiment_id
    (run,) = client.search_runs([experiment], query)
    return run.info.run_id


@pytest.fixture(scope="module")
def run_id(population) -> str:
    """A finished lenet run of the population."""
    return population_run(
        population,
        "params.`model.name` = 'lenet' and params.seed = '0' and params.width = '3' "
        "and params.`optimizer.lr` = '0.05'",
    )


@pytest.fixture(scope="module")
def run_ids(population) -> list[str]:
    """Three finished runs of the population: an mlp, a lenet and an mlp."""
    choices = [("mlp", "0.3", "2"), ("lenet", "0.003", "3"), ("mlp", "0.05", "3")]
    return [
        population_run(
            population,
            f"params.`model.name` = '{model}' and params.seed = '1' and params.width = "
            f"'{width}' and params.`optimizer.lr` = '{lr}'",
        )
        for model, lr, width in choices
    ]


@pytest.fixture(scope="module")
def default_run(population) -> str:
    """A run of the default config (graph settings included), tiny: mlp, width 2, 3 epochs."""
    return train(
        compose_config(
            [
                "model=mlp", "width=2", "epochs=3", "device=cpu",
                f"tracking.uri={population['uri']}",
                f"tracking.artifact_root={population['artifacts']}",
                "tracking.experiment=default-runs",
            ]
        )
    )["run_id"]  # fmt: skip


def requested(population, *run_ids: str) -> pd.DataFrame:
    """The runs' request rows, built from the store as ``mlflow-tg predict`` builds them."""
    client = MlflowClient(population["uri"])
    runs = [load_run(client, run_id) for run_id in run_ids]
    return pd.concat([model_input(r.history, r.params, r.run_id) for r in runs], ignore_index=True)


def in_process(population, frame: pd.DataFrame) -> pd.DataFrame:
    mlflow.set_tracking_uri(population["uri"])
    return load_run_predictor(f"models:/{NAME}@champion").predict(frame)


def invocations(endpoint: str, body: str) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    return requests.post(f"{endpoint}/invocations", data=body, headers=headers, timeout=60)


@pytest.mark.slow
def test_three_runs_in_one_request_get_the_in_process_answers_in_order(
    endpoint, population, run_ids
):
    frame = requested(population, *run_ids)
    served = ask_endpoint(endpoint, frame)
    assert served["run_id"].tolist() == run_ids and served["k"].tolist() == [3, 3, 3]
    pd.testing.assert_frame_equal(served, in_process(population, frame), check_dtype=False)
    assert (served["predicted_test_acc_low"] <= served["predicted_test_acc"]).all()
    assert (served["predicted_test_acc"] <= served["predicted_test_acc_high"]).all()


@pytest.mark.slow
def test_a_default_config_run_gets_the_in_process_answer_flagged_out_of_distribution(
    endpoint, population, default_run
):
    frame = requested(population, default_run)
    served = ask_endpoint(endpoint, frame)
    pd.testing.assert_frame_equal(served, in_process(population, frame), check_dtype=False)
    (answer,) = served.to_dict("records")
    assert answer["k"] == 3 and 0 <= answer["predicted_test_acc"] <= 1
    assert answer["out_of_distribution"]  # the population trains 4 epochs of batch 32
    reasons = answer["ood_reasons"].split("; ")
    assert "batch_size 128 outside trained range [32, 32]" in reasons
    assert "epochs 3 outside trained range [4, 4]" in reasons


def rest_request(server: str, run_ids: list[str], last_epoch: int = 99, drop: str = "") -> str:
    """A request body built with requests and pandas only, from MLflow's REST API."""
    frames = []
    for run_id in run_ids:
        got = requests.get(f"{server}/api/2.0/mlflow/runs/get", params={"run_id": run_id})
        run = got.json()["run"]
        artifact = requests.get(
            f"{server}/get-artifact", params={"path": "history.parquet", "run_uuid": run_id}
        )
        assert got.status_code == artifact.status_code == 200
        history = pd.read_parquet(io.BytesIO(artifact.content))
        history = history[history["epoch"] <= last_epoch]
        history = history.drop(columns=[c for c in history if drop and c.startswith(drop)])
        params = {param["key"]: param["value"] for param in run["data"]["params"]}
        frames.append(history.assign(run_id=run["info"]["run_id"], **params))
    frame = pd.concat(frames)
    # json, not DataFrame.to_json: that rounds to 15 decimals (pagerank values of 1e-6 keep 9
    # digits), enough to move this test's predictions by 0.003
    data = frame.astype(object).where(frame.notna(), None).to_numpy().tolist()
    return json.dumps({"dataframe_split": {"columns": list(frame.columns), "data": data}})


@pytest.mark.slow
def test_any_http_client_gets_answers_for_runs_read_from_the_tracking_servers_rest_api(
    tracking, endpoint, population, run_ids
):
    response = invocations(endpoint, rest_request(tracking, run_ids))
    assert response.status_code == 200, response.text[-2000:]
    answers = pd.DataFrame(response.json()["predictions"])
    assert answers["run_id"].tolist() == run_ids
    expected = in_process(population, requested(population, *run_ids))
    for column in ANSWER:
        assert answers[column].tolist() == pytest.approx(expected[column].tolist(), rel=1e-9)
    assert answers["out_of_distribution"].tolist() == expected["out_of_distribution"].tolist()


@pytest.mark.slow
def test_a_request_with_too_few_epochs_gets_a_400_naming_the_run(tracking, endpoint, run_ids):
    response = invocations(endpoint, rest_request(tracking, run_ids[:2], last_epoch=0))
    assert response.status_code == 400
    message = response.json()["message"]
    assert "cannot answer 2 of the 2 runs of the request" in message
    for run_id in run_ids[:2]:
        assert f"- run {run_id}: it has epoch 0 but the predictor needs epochs 0..1" in message


@pytest.mark.slow
def test_a_request_without_graph_metrics_gets_a_400_naming_the_setting(tracking, endpoint, run_id):
    response = invocations(endpoint, rest_request(tracking, [run_id], drop="tg."))
    assert response.status_code == 400
    message = response.json()["message"]
    assert f"- run {run_id}: it lacks what the model of window k=3 (epochs 0..3) reads:" in message
    assert "logged with graph.enabled=true and graph.centralities including " in message


@pytest.mark.slow
def test_a_string_in_a_number_column_gets_a_400(endpoint, population, run_id):
    frame = requested(population, run_id).assign(val_acc="tiny")
    response = invocations(endpoint, request_body(frame))
    assert response.status_code == 400 and "val_acc" in response.text


@pytest.mark.slow
@pytest.mark.parametrize("body", ["", "{}", "not json"])
def test_an_empty_or_malformed_body_gets_a_4xx(endpoint, body):
    assert 400 <= invocations(endpoint, body).status_code < 500


def mlflow_tg(*arguments: str, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (or the module under ``python``)."""
    command = [*python, "-m", "mlflow_tg.serve.cli"] if python else [str(BIN / "mlflow-tg")]
    return subprocess.run(
        [*command, *arguments], capture_output=True, text=True, timeout=300
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("through_endpoint", [True, False])
def test_cli_predicts_logs_and_prints_the_answer_quietly(
    endpoint, population, run_id, champion, through_endpoint
):
    extra = ["--endpoint", endpoint] if through_endpoint else []
    result = mlflow_tg("predict", "--run-id", run_id, "--tracking-uri", population["uri"], *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # quiet: no MLflow logs, warnings or progress bars
    (expected,) = in_process(population, requested(population, run_id)).to_dict("records")
    client = MlflowClient(population["uri"])
    for key, column in zip(PREDICTED, ANSWER, strict=True):
        (logged,) = client.get_metric_history(run_id, key)[-1:]
        assert logged.step == 3 and logged.value == pytest.approx(expected[column])
    ood = client.get_metric_history(run_id, "predicted/out_of_distribution")[-1]
    assert ood.value == float(expected["out_of_distribution"])
    in_here = f"models:/{NAME}/{champion['version']} in process"
    tag = client.get_run(run_id).data.tags["mlflow_tg.predicted_by"]
    assert tag == (f"the model served at {endpoint}" if through_endpoint else in_here)
    first, second = result.stdout.splitlines()
    assert first.startswith(f"run {run_id}: predicted final test accuracy ")
    interval = (
        f"[{expected['predicted_test_acc_low']:.4f}, {expected['predicted_test_acc_high']:.4f}]"
    )
    assert f"{expected['predicted_test_acc']:.4f}, interval {interval}" in first
    assert "from epochs 0..3" in first
    flag = "out of distribution: " if expected["out_of_distribution"] else "in distribution"
    assert second.startswith(flag)


@pytest.mark.slow
def test_cli_on_a_sqlite_store_imports_neither_mlflow_nor_torch(population, run_id, champion):
    command = ("predict", "--run-id", run_id, "--tracking-uri", population["uri"])
    result = mlflow_tg(*command, python=(sys.executable, "-X", "importtime"))
    assert result.returncode == 0, result.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()]
    assert "catboost" in imported  # the version's answerer, loaded in process
    assert "mlflow_tg.tracking.sqlite" in imported
    banned = ("torch", "torchvision", "mlflow")
    assert not [name for name in imported if name.split(".")[0] in banned]
    assert "mlflow_tg.config" not in imported
    assert f"models:/{NAME}/{champion['version']} in process" in result.stdout


@pytest.mark.slow
def test_cli_answers_a_version_without_its_answerer_through_mlflows_client(
    population, run_ids, champion, tmp_path
):
    """A version logged before versions carried ``answerer.pkl``: the same answer, via MLflow."""
    import yaml

    client = MlflowClient(population["uri"])
    logged = client.get_model_version(NAME, champion["version"])
    mlflow.set_tracking_uri(population["uri"])
    older = Path(mlflow.artifacts.download_artifacts(str(logged.source), dst_path=tmp_path))
    (older / "artifacts" / "answerer.pkl").unlink()
    spec = yaml.safe_load((older / "MLmodel").read_text())
    del spec["flavors"]["python_function"]["artifacts"]["answerer"]
    (older / "MLmodel").write_text(yaml.safe_dump(spec))
    client.create_registered_model("older")
    version = client.create_model_version("older", str(older), tags=dict(logged.tags))
    client.set_registered_model_alias("older", "champion", version.version)
    run_id = run_ids[1]
    before = client.get_metric_history(run_id, PREDICTED[0])
    command = ("predict", "--run-id", run_id, "--tracking-uri", population["uri"])
    result = mlflow_tg(*command, "--model", "older")
    assert result.returncode == 0, result.stderr[-3000:]
    (expected,) = in_process(population, requested(population, run_id)).to_dict("records")
    (logged,) = [m for m in client.get_metric_history(run_id, PREDICTED[0]) if m not in before]
    assert logged.value == expected[ANSWER[0]]  # logged once, the champion's own answer
    assert f"models:/older/{version.version} in process" in result.stdout


@pytest.mark.slow
def test_cli_over_http_logs_the_served_answer_without_mlflows_client(
    tracking, endpoint, population, run_ids, champion
):
    run_id = run_ids[2]
    client = MlflowClient(population["uri"])
    served = client.get_model_version(NAME, champion["version"])
    # the store's version under the asked alias is not the one served: it reads one window
    other = client.create_model_version(NAME, served.source, tags={keys.KS_TAG: "1"})
    client.set_registered_model_alias(NAME, "one-window", other.version)
    command = ("predict", "--run-id", run_id, "--tracking-uri", tracking, "--endpoint", endpoint,
               "--alias", "one-window")  # fmt: skip
    try:
        result = mlflow_tg(*command, python=(sys.executable, "-X", "importtime"))
    finally:  # the module's other tests see the registry as it was
        client.delete_registered_model_alias(NAME, "one-window")
        client.delete_model_version(NAME, other.version)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in lines}
    assert "requests" in imported and not {"mlflow", "pandas", "polars", "torch"} & imported
    assert "--model and --alias are not used with --endpoint" in result.stderr
    (expected,) = in_process(population, requested(population, run_id)).to_dict("records")
    for key, column in zip(PREDICTED, ANSWER, strict=True):  # the served model's largest window
        (logged,) = client.get_metric_history(run_id, key)[-1:]
        assert logged.step == 3 and logged.value == pytest.approx(expected[column], rel=1e-12)
    tag = client.get_run(run_id).data.tags["mlflow_tg.predicted_by"]
    assert tag == f"the model served at {endpoint}"
    assert result.stdout.startswith(f"run {run_id}: predicted final test accuracy ")


def live_copy(
    client: MlflowClient, run_id: str, epochs: int, experiment: str = "population"
) -> str:
    """A RUNNING run with the params of ``run_id`` and its first epochs."""
    finished = load_run(client, run_id)
    found = client.get_experiment_by_name(experiment)
    experiment = found.experiment_id if found else client.create_experiment(experiment)
    live = client.create_run(experiment, run_name="still-training").info.run_id
    for key, value in finished.params.items():
        client.log_param(live, key, value)
    rows = finished.history[:epochs]
    with tempfile.TemporaryDirectory() as tmp:
        pl.DataFrame(rows).write_parquet(Path(tmp) / HISTORY_ARTIFACT)
        client.log_artifact(live, str(Path(tmp) / HISTORY_ARTIFACT))
    return live


@pytest.mark.slow
def test_cli_predicts_a_run_that_is_still_running_from_the_window_it_has(
    population, run_id, champion
):
    client = MlflowClient(population["uri"])
    live = live_copy(client, run_id, 3)  # epochs 0..2
    try:
        result = mlflow_tg("predict", "--run-id", live, "--tracking-uri", population["uri"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert client.get_run(live).info.status == "RUNNING"
        assert client.get_metric_history(live, "predicted/test_acc")[-1].step == 2
        assert "from epochs 0..2" in result.stdout
    finally:
        client.set_terminated(live)


@pytest.mark.slow
@pytest.mark.parametrize("through_endpoint", [True, False])
def test_cli_refuses_a_run_with_too_few_epochs_naming_it(
    endpoint, population, run_id, champion, through_endpoint
):
    client = MlflowClient(population["uri"])
    young = live_copy(client, run_id, 1)  # epoch 0 only
    extra = ["--endpoint", endpoint] if through_endpoint else []
    try:
        result = mlflow_tg("predict", "--run-id", young, "--tracking-uri", population["uri"],
                           *extra)  # fmt: skip
    finally:
        client.set_terminated(young)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"- run {young}: it has epoch 0 but the predictor needs epochs 0..1" in result.stderr
    assert "predicted/test_acc" not in client.get_run(young).data.metrics


@pytest.mark.slow
def test_cli_answers_a_diverged_run_with_its_known_final_accuracy(population, run_id):
    client = MlflowClient(population["uri"])
    diverged = live_copy(client, run_id, 2, "diverged-runs")  # not a training example
    client.set_tag(diverged, "diverged", "true")
    client.log_metric(diverged, "test_acc", 0.098, step=1)
    client.set_terminated(diverged)
    result = mlflow_tg("predict", "--run-id", diverged, "--tracking-uri", population["uri"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run {diverged} diverged (tag diverged=true): its final test accuracy 0.0980 is " \
           "known, so that is the answer (interval [0.0980, 0.0980])" in result.stdout  # fmt: skip
    for key in PREDICTED:
        (logged,) = client.get_metric_history(diverged, key)
        assert (logged.value, logged.step) == (0.098, 1)
    tags = client.get_run(diverged).data.tags
    assert tags["mlflow_tg.predicted_by"] == "final test_acc of the diverged run (known, not " \
                                             "predicted)"  # fmt: skip


@pytest.mark.slow
def test_cli_names_an_unknown_run_and_a_missing_model(population, run_id, tmp_path):
    result = mlflow_tg("predict", "--run-id", "nope", "--tracking-uri", population["uri"])
    assert result.returncode == 2 and "run 'nope' is not in the tracking store" in result.stderr
    command = ("predict", "--run-id", run_id, "--tracking-uri", population["uri"])
    result = mlflow_tg(*command, "--model", "no-such-model")
    assert result.returncode == 2 and "has no model 'no-such-model'" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("through_server", [False, True])
def test_cli_asks_an_endpoint_even_when_the_runs_store_has_no_registered_version(
    tracking, endpoint, population, run_id, through_server
):
    uri = tracking if through_server else population["uri"]
    command = ("predict", "--run-id", run_id, "--tracking-uri", uri)
    result = mlflow_tg(*command, "--model", "not-registered-here", "--endpoint", endpoint)
    assert result.returncode == 0, result.stderr[-3000:]
    (expected,) = in_process(population, requested(population, run_id)).to_dict("records")
    assert f"{expected['predicted_test_acc']:.4f}" in result.stdout  # sent the whole history
    tag = MlflowClient(population["uri"]).get_run(run_id).data.tags["mlflow_tg.predicted_by"]
    assert tag == f"the model served at {endpoint}"


def test_serving_a_store_without_the_version_is_one_paragraph_naming_what_to_do(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # an empty store: no registered model
    result = mlflow_tg("serve", "--tracking-uri", uri, "--port", str(free_port()))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = result.stderr.splitlines()
    assert f"has no model '{NAME}' with alias 'champion'; fit one there first" in line
    result = mlflow_tg("serve", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert result.returncode == 2 and "no tracking store there" in result.stderr


def test_cli_names_an_address_that_cannot_be_right_at_once(tmp_path):
    missing = tmp_path / "no" / "mlflow.db"
    result = mlflow_tg("predict", "--run-id", "r", "--tracking-uri", f"sqlite:///{missing}")
    assert result.returncode == 2
    assert f"no tracking store there ({missing} does not exist)" in result.stderr
    assert not missing.parent.exists()  # no empty store created in its place
    server = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = mlflow_tg("predict", "--run-id", "r", "--tracking-uri", server)
    assert time.monotonic() - started < 30  # MLflow's client would retry for minutes
    assert result.returncode == 2
    assert f"--tracking-uri {server}: no MLflow tracking server answers there" in result.stderr
    store = tmp_path / "mlflow.db"
    store.touch()
    result = mlflow_tg("predict", "--run-id", "r", "--tracking-uri", f"sqlite:///{store}",
                       "--endpoint", "127.0.0.1:5001")  # fmt: skip
    assert result.returncode == 2
    assert "--endpoint '127.0.0.1:5001' is not a URL: give its scheme, for example " \
           "http://127.0.0.1:5001" in result.stderr  # fmt: skip


@pytest.mark.slow
def test_cli_names_a_column_based_version_that_cannot_answer_runs(population, run_id):
    from catboost import CatBoostRegressor

    x = pd.DataFrame({"val_acc@2": [0.1, 0.5, 0.9], "width": [2.0, 3.0, 2.0]})
    old = CatBoostRegressor(iterations=5, verbose=False, allow_writing_files=False)
    old.fit(x, [0.1, 0.5, 0.9])
    mlflow.set_tracking_uri(population["uri"])
    mlflow.set_experiment("tg-predictor")
    with mlflow.start_run():
        info = mlflow.catboost.log_model(old, name="model", pip_requirements=["catboost"],
                                         signature=infer_signature(x, old.predict(x)))  # fmt: skip
    version = mlflow.register_model(info.model_uri, "column-based")
    MlflowClient().set_registered_model_alias("column-based", "champion", version.version)
    command = ("predict", "--run-id", run_id, "--tracking-uri", population["uri"])
    result = mlflow_tg(*command, "--model", "column-based")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"models:/column-based/{version.version} is a column-based model" in result.stderr
    assert "it cannot score runs" in result.stderr


def test_an_answer_without_rows_per_run_is_an_endpoint_error(monkeypatch):
    class Answer:
        status_code, text = 200, '{"predictions": [0.5]}'  # a column-based version's answer

        def json(self):
            return json.loads(self.text)

    monkeypatch.setattr(requests, "post", lambda *args, **kwargs: Answer())
    with pytest.raises(EndpointError, match=r"without an answer per run .*\[0\.5\]"):
        ask_endpoint("http://127.0.0.1:1", pd.DataFrame({"run_id": ["r"], "epoch": [0]}))


def test_a_refusal_reads_as_the_models_own_words(monkeypatch):
    text = json.dumps(
        {"error_code": "INVALID_PARAMETER_VALUE",
         "message": "Failed to predict data 'run_id ...'. \nError: cannot answer 1 of the 1 runs"}
    )  # fmt: skip

    class Answer:
        status_code = 400

    Answer.text = text
    monkeypatch.setattr(requests, "post", lambda *args, **kwargs: Answer())
    with pytest.raises(EndpointError) as error:
        ask_endpoint("http://127.0.0.1:1", pd.DataFrame({"run_id": ["r"], "epoch": [0]}))
    assert str(error.value) == (
        "the predictor endpoint http://127.0.0.1:1 answered HTTP 400: cannot answer 1 of the 1 runs"
    )
