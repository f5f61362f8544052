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
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import requests
from mlflow.pyfunc import PyFuncModel

from mlflow_tg.features import MISSING_CATEGORY, design_matrix, missing_value

WARN_NAMES = 5  # columns named in a warning about missing ones


class EndpointError(RuntimeError):
    """The endpoint could not be reached, refused the request or answered no prediction."""


def warn_missing(columns: list[str], available: Collection[str], what: str) -> None:
    """Tell stderr how many (and which first few) of a model's columns ``what`` lacks."""
    missing = [column for column in columns if column not in available]
    if missing:
        named = ", ".join(missing[:WARN_NAMES]) + (", …" if len(missing) > WARN_NAMES else "")
        print(
            f"warning: {what} lacks {len(missing)} of the model's {len(columns)} feature "
            f"columns ({named}); they count as not logged (NaN, or '{MISSING_CATEGORY}' for a "
            "category), as for such a run in the fitting table.",
            file=sys.stderr,
        )


def model_row(features: Mapping[str, float | str], columns: list[str]) -> dict[str, float | str]:
    """The row a model reads, its columns in order: the endpoint's request and in-process input.

    At fit time a run without some column has it missing (the table holds the union of the
    runs' columns); a served run without it gets the same missing value, not an error.
    """
    warn_missing(columns, features, "the run")
    return {column: features.get(column, missing_value(column)) for column in columns}


def request_body(features: Mapping[str, float | str]) -> dict:
    """One row in MLflow's ``dataframe_split`` form (NaN, valid for MLflow, stays NaN)."""
    columns = list(features)
    return {"dataframe_split": {"columns": columns, "data": [[features[c] for c in columns]]}}


def ask_endpoint(url: str, features: Mapping[str, float | str], timeout_s: float = 30) -> float:
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
    try:
        return float(response.json()["predictions"][0])
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise EndpointError(
            f"the predictor endpoint {url} answered HTTP 200 without a prediction "
            f'(expected {{"predictions": [number]}}): {response.text[:2000]}'
        ) from error


def model_columns(model: str | PyFuncModel) -> list[str]:
    """The feature columns a logged model's signature names, in its order."""
    metadata = mlflow.models.get_model_info(model) if isinstance(model, str) else model.metadata
    return metadata.signature.inputs.input_names()


def predict_frame(model: str | PyFuncModel, frame: pl.DataFrame) -> np.ndarray:
    """A logged model's predictions (by URI, or loaded) for feature rows, schema checked.

    A column of the model that the frame lacks is missing in every row, as in ``model_row``.
    """
    loaded = mlflow.pyfunc.load_model(model) if isinstance(model, str) else model
    columns = model_columns(loaded)
    warn_missing(columns, frame.columns, "the feature table")
    return np.ravel(loaded.predict(design_matrix(frame, columns))).astype(float)


def predict_in_process(model_uri: str, features: Mapping[str, float | str]) -> float:
    """The prediction of a registered model loaded here, from the row an endpoint would get."""
    model = mlflow.pyfunc.load_model(model_uri)
    row = model_row(features, model_columns(model))
    prediction = float(predict_frame(model, pl.DataFrame([row]))[0])
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
