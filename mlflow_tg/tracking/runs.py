"""Finished training runs read back from MLflow: config, outcome and per-epoch history.

A run's whole history is its ``history.parquet`` artifact (rewritten at every epoch, so it is
current while the run is still going): one download per run instead of one request per metric
key. Runs are listed with one paginated search; histories download on a few threads, since a
tracking server answers requests in parallel.
"""

from __future__ import annotations

import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run, RunStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from mlflow_tg import keys
from mlflow_tg.tracking.health import refused_access
from mlflow_tg.tracking.records import (
    CorruptHistoryError,
    RunNotFoundError,
    RunRecord,
    history_rows,
    pointing_at,
)

log = logging.getLogger(__name__)
TARGET = keys.TARGET
FINISHED = RunStatus.to_string(RunStatus.FINISHED)
NOT_FOUND = ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)
WARN_RUNS = 5  # run ids named in a warning


def has_artifact(client: MlflowClient, run_id: str, path: str) -> bool:
    """Whether the run lists the artifact (raises when the store cannot be reached)."""
    return any(artifact.path == path for artifact in client.list_artifacts(run_id))


def read_history(client: MlflowClient, run_id: str) -> list[dict[str, float]] | None:
    """The run's per-epoch metrics, from its ``history.parquet``; None when it has none."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, keys.HISTORY, tmp)
        except MlflowException as error:
            # MLflow reports any failed download (a network error too) as a missing path: only
            # a listing without the artifact means the run has none
            if error.error_code != NOT_FOUND or has_artifact(client, run_id, keys.HISTORY):
                raise
            return None
        return history_rows(Path(path), run_id)


def record(client: MlflowClient, run: Run, with_history: bool = True) -> RunRecord:
    """A RunRecord from a run found by search or by id."""
    return RunRecord(
        run_id=run.info.run_id,
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
        history=read_history(client, run.info.run_id) if with_history else None,
    )


def load_run(client: MlflowClient, run_id: str) -> RunRecord:
    """One run, running or finished, with its history."""
    try:
        run = client.get_run(run_id)
    except Exception as error:
        if refused_access(error) is not None:  # the run may well be there
            raise
        raise RunNotFoundError(
            f"run {run_id!r} is not in the tracking store {client.tracking_uri}: {error}"
        ) from error
    found = record(client, run)
    if found.history is None:
        raise RunNotFoundError(
            f"run {run_id} has no {keys.HISTORY} artifact; only runs of mlflow_tg's "
            "train.py have one."
        )
    return found


def finished_runs(client: MlflowClient, experiment: str) -> list[Run]:
    """Every finished run of ``experiment``, by one paginated search."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments(view_type=ViewType.ALL)]
        raise RunNotFoundError(
            f"experiment {experiment!r} is not in the tracking store {client.tracking_uri}; it "
            f"has {names}. Make a population first: python train.py -m +experiment=population"
            f"{pointing_at(client.tracking_uri)}"
        )
    # Not mlflow.search_runs(output_format="list"), MLflow's own pager: it searches through
    # MlflowClient(), the global tracking URI, not ``client``'s store (a client made for
    # another store, as in tests/test_predictor.py, would list the wrong runs).
    runs, token = [], None
    while True:
        page = client.search_runs(
            [found.experiment_id],
            filter_string=f"attributes.status = '{FINISHED}'",
            max_results=1000,
            page_token=token,
        )
        runs += page
        token = page.token
        if not token:
            break
    return runs


def load_runs(client: MlflowClient, experiment: str, threads: int = 8) -> list[RunRecord]:
    """Every finished run of ``experiment``, with the history of each that has a final TARGET.

    A run without it is no training example, so its history is not downloaded; a run without
    a history artifact, or with one that cannot be read (``history_error`` says why), is kept
    (history None) for the caller to count, and logged.
    """
    runs = finished_runs(client, experiment)

    def read(run: Run) -> RunRecord:
        try:
            return record(client, run, TARGET in run.data.metrics)
        except CorruptHistoryError as error:  # one damaged file leaves one run out, not all
            found = record(client, run, with_history=False)
            found.history_error = str(error)
            return found

    with ThreadPoolExecutor(threads) as pool:
        records = list(pool.map(read, runs))
    damaged = [r for r in records if r.history_error]
    for found in damaged[:WARN_RUNS]:
        log.warning("left out: %s", found.history_error)
    if len(damaged) > WARN_RUNS:
        log.warning("%d more runs left out: their %s cannot be read", len(damaged) - WARN_RUNS,
                    keys.HISTORY)  # fmt: skip
    lacking = [
        r.run_id
        for r in records
        if r.history is None and TARGET in r.metrics and not r.history_error
    ]
    if lacking:
        named = ", ".join(lacking[:WARN_RUNS]) + (" …" if len(lacking) > WARN_RUNS else "")
        log.warning(
            "%d finished runs of %r have no %s and are left out: %s",
            len(lacking),
            experiment,
            keys.HISTORY,
            named,
        )
    return records
