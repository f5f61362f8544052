"""``mlflow-tg predict`` over HTTP only: a tracking server's REST API and a served model.

With an ``http(s)://`` tracking URI and ``--endpoint``, the command needs nothing of MLflow's
client, nor pandas: ``import mlflow`` alone costs about 1.3 s of CPU, a SQLite store's
SQLAlchemy 0.5 s more, which is the whole budget of a command meant to run per run of a sweep.
Four requests: the run (``runs/get``), its ``history.parquet`` (``/get-artifact``), the
endpoint's answer, and one ``runs/log-batch`` with the predicted metrics and the
``predicted_by`` tag. Credentials as MLflow's client reads them:
``MLFLOW_TRACKING_TOKEN``, or ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import requests

from mlflow_tg import keys
from mlflow_tg.predictor.endpoint import cell
from mlflow_tg.tracking.health import access_refused
from mlflow_tg.tracking.records import RunRecord

API = "/api/2.0/mlflow"


class TrackingServerError(LookupError):
    """The tracking server refused a request, or has no such run, history or model."""


class Server:
    """A tracking server's REST API, with MLflow's credentials from the environment."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.session = requests.Session()
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        user, password = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD"))
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif user and password:
            self.session.auth = (user, password)

    def call(self, method: str, path: str, what: str, **options: Any) -> requests.Response:
        """One request; TrackingServerError naming ``what`` unless it answers 200."""
        try:
            response = self.session.request(method, f"{self.uri}{path}", timeout=30, **options)
        except requests.RequestException as error:
            raise TrackingServerError(f"{what}: {self.uri} cannot be reached ({error})") from error
        if (refused := access_refused(response.status_code)) is not None:
            raise TrackingServerError(f"{self.uri}: {refused}")
        if response.status_code != 200:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise TrackingServerError(f"{what}: HTTP {response.status_code} from {self.uri}: "
                                      f"{message[:1000]}")  # fmt: skip
        return response

    def record(self, run_id: str) -> RunRecord:
        """``runs/get`` and the run's history."""
        what = f"run {run_id!r} is not in the tracking store {self.uri}"
        found = self.call("GET", f"{API}/runs/get", what, params={"run_id": run_id}).json()
        data = found["run"]["data"]
        return RunRecord(
            run_id,
            params={param["key"]: param["value"] for param in data.get("params", [])},
            tags={tag["key"]: tag["value"] for tag in data.get("tags", [])},
            metrics={metric["key"]: metric["value"] for metric in data.get("metrics", [])},
            history=self.history(run_id),
        )

    def history(self, run_id: str) -> list[dict[str, Any]]:
        """The run's ``history.parquet`` rows, by epoch."""
        import pyarrow.parquet as pq

        what = f"run {run_id} has no {keys.HISTORY} artifact; only runs of mlflow_tg's train.py do"
        params = {"path": keys.HISTORY, "run_uuid": run_id}
        raw = self.call("GET", "/get-artifact", what, params=params).content
        try:  # ParquetFile: read_table imports pandas
            rows = pq.ParquetFile(io.BytesIO(raw)).read().to_pylist()
        except Exception as error:  # pyarrow's errors on a damaged file vary
            raise TrackingServerError(
                f"run {run_id}: its artifact {keys.HISTORY} cannot be read "
                f"({type(error).__name__}: {error}); the copy in the store is damaged"
            ) from error
        return sorted(rows, key=lambda row: row[keys.EPOCH])

    def log(self, run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
        """``runs/log-batch``: metrics at ``step`` and tags, in one request."""
        now = int(time.time() * 1000)
        body = {
            "run_id": run_id,
            "metrics": [
                {"key": k, "value": v, "timestamp": now, "step": step} for k, v in metrics.items()
            ],
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        self.call("POST", f"{API}/runs/log-batch", f"could not log to run {run_id}", json=body)


def history_request(history: list[dict[str, Any]], params: dict[str, str], run_id: str) -> str:
    """The run's request: one row per epoch with its metrics and params; missing values null.

    All of them: the model takes those it reads, MLflow's scoring server drops the others.
    """
    metrics = list(dict.fromkeys(k for row in history for k in row if k != keys.EPOCH))
    columns = [keys.RUN_ID, keys.EPOCH, *map(keys.upgrade_graph_key, metrics), *params]
    data = [
        [run_id, int(row[keys.EPOCH]), *(cell(row.get(m)) for m in metrics), *params.values()]
        for row in history
    ]
    return json.dumps({"dataframe_split": {"columns": columns, "data": data}})
