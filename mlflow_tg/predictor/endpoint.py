"""Asking a served predictor about runs: MLflow's scoring server, plain HTTP.

The endpoint is ``mlflow models serve -m models:/NAME@champion``: the request is the runs' rows
(``model.model_input``: one row per run and epoch) in ``dataframe_split`` form, the answer one
row per run (``{"predictions": [{"run_id": …, "predicted_test_acc": …}, …]}``). A request the
model refuses (too few epochs, a metric or param it reads missing) is an HTTP 400 whose message
names the run and what it lacks.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import requests

from mlflow_tg import keys

if TYPE_CHECKING:  # pandas only where a frame is made: the HTTP-only CLI path imports no pandas
    import pandas as pd

ANSWER_COLUMNS = (keys.RUN_ID, keys.ANSWER_K, keys.ANSWER, keys.ANSWER_LOW, keys.ANSWER_HIGH)


class EndpointError(RuntimeError):
    """The endpoint could not be reached, refused the request or answered no prediction."""


def cell(value: object) -> object:
    """A JSON cell: NaN and None as null, numpy scalars as Python ones."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def request_body(frame: pd.DataFrame) -> str:
    """Request rows in MLflow's ``dataframe_split`` form; missing values as null.

    ``json.dumps``, not ``DataFrame.to_json``: that keeps 10 significant digits by default (15
    at most), and the served answer must equal the in-process one.
    """
    data = [[cell(value) for value in row] for row in frame.itertuples(index=False, name=None)]
    return json.dumps({"dataframe_split": {"columns": list(frame.columns), "data": data}})


def refusal(text: str) -> str:
    """The model's own words from an error answer of MLflow's scoring server.

    Its message reads "Failed to predict data '<the request>'." and, on the next line,
    "Error: <the model's message>"; the echo of the request is left out.
    """
    try:
        message = json.loads(text)["message"]
    except (ValueError, KeyError, TypeError):
        return text[:2000]
    return message.split("\nError: ", 1)[-1]


def post_request(url: str, body: str, timeout_s: float = 30) -> list:
    """POST a request body to the endpoint; its ``predictions``, or EndpointError."""
    try:
        response = requests.post(
            f"{url.rstrip('/')}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=timeout_s,
        )
    except requests.RequestException as error:
        raise EndpointError(f"could not reach the predictor endpoint {url}: {error}") from error
    if response.status_code != 200:
        raise EndpointError(
            f"the predictor endpoint {url} answered HTTP {response.status_code}: "
            f"{refusal(response.text)}"
        )
    try:
        answers = response.json()["predictions"]
        if not all(column in answer for answer in answers for column in ANSWER_COLUMNS):
            raise KeyError("answer columns")
        return answers
    except (ValueError, KeyError, TypeError) as error:
        raise EndpointError(
            f"the predictor endpoint {url} answered HTTP 200 without an answer per run "
            f'(expected {{"predictions": [{{"run_id": …, "{keys.ANSWER}": …}}, …]}}; is it '
            f"serving a version of the former, column-based kind?): {response.text[:2000]}"
        ) from error


def ask_endpoint(url: str, frame: pd.DataFrame, timeout_s: float = 30) -> pd.DataFrame:
    """The endpoint's answer: one row per run of ``frame``, in order, as in-process ``predict``."""
    import pandas as pd

    answers = post_request(url, request_body(frame), timeout_s)
    return pd.DataFrame(answers, columns=list(answers[0]) if answers else ANSWER_COLUMNS)
