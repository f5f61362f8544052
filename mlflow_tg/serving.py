"""Asking a registered predictor about a run: through a served endpoint, or in this process.

The endpoint is MLflow's own scoring server (``mlflow models serve -m models:/NAME@champion``):
one JSON row in ``dataframe_split`` form, the features named as the model's signature names
them. The server checks that signature: a missing feature or a wrongly typed one is an HTTP 400
naming it.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import polars as pl
import requests

from mlflow_tg.features import design_matrix


class EndpointError(RuntimeError):
    """The endpoint could not be reached or refused the request."""


def request_body(features: dict[str, float | str]) -> dict:
    """One row in MLflow's ``dataframe_split`` form (NaN, valid for MLflow, stays NaN)."""
    columns = list(features)
    return {"dataframe_split": {"columns": columns, "data": [[features[c] for c in columns]]}}


def ask_endpoint(url: str, features: dict[str, float | str], timeout_s: float = 30) -> float:
    """The endpoint's prediction for one row of features."""
    try:
        response = requests.post(
            f"{url.rstrip('/')}/invocations",
            data=json.dumps(request_body(features)),  # allow_nan: MLflow parses NaN
            headers={"Content-Type": "application/json"},
            timeout=timeout_s,
        )
    except requests.RequestException as error:
        raise EndpointError(f"could not reach the predictor endpoint {url}: {error}") from error
    if response.status_code != 200:
        raise EndpointError(
            f"the predictor endpoint {url} answered HTTP {response.status_code}: "
            f"{response.text[:2000]}"
        )
    return float(response.json()["predictions"][0])


def model_columns(model_uri: str) -> list[str]:
    """The feature columns a logged model's signature names."""
    return mlflow.models.get_model_info(model_uri).signature.inputs.input_names()


def predict_in_process(model_uri: str, features: dict[str, float | str]) -> float:
    """The prediction of a registered model loaded here, with the same schema checks."""
    model = mlflow.pyfunc.load_model(model_uri)
    columns = model.metadata.get_input_schema().input_names()
    missing = [column for column in columns if column not in features]
    if missing:
        raise EndpointError(f"{model_uri} needs features this run does not have: {missing}")
    row = pl.DataFrame([{column: features[column] for column in columns}])
    prediction = float(model.predict(design_matrix(row, columns))[0])
    return prediction if math.isfinite(prediction) else math.nan


def free_port() -> int:
    """A TCP port nobody listens on right now, on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    """Whether ``url`` answers HTTP 200 now."""
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@contextmanager
def running_server(
    arguments: list[str], ready_url: str, log: Path, env: dict | None = None, timeout_s: float = 180
) -> Iterator[subprocess.Popen]:
    """Start a server process, wait until ``ready_url`` answers 200, and always stop it.

    Its output goes to ``log``: a pipe nobody reads fills up and blocks a chatty server.
    """
    with open(log, "w") as output:
        process = subprocess.Popen(arguments, stdout=output, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout_s
            while not answers(ready_url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{arguments[:4]} did not start: {log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
