"""Asking a registered predictor about a run: through a served endpoint, or in this process.

The endpoint is MLflow's own scoring server (``mlflow models serve -m models:/NAME@champion``):
one JSON row in ``dataframe_split`` form, the features named as the model's signature names
them. The server checks that signature: a missing feature or a wrongly typed one is an HTTP 400
naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import requests


class EndpointError(RuntimeError):
    """The endpoint could not be reached, refused the request or answered no prediction."""


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
