"""Finished training runs read back from MLflow: config, outcome and per-epoch history.

A run's whole history is its ``history.parquet`` artifact (rewritten at every epoch, so it is
current while the run is still going): one download per run instead of one request per metric
key. Runs are listed with one paginated search; histories download on a few threads, since a
tracking server answers requests in parallel.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from mlflow import MlflowClient
from mlflow.entities import Run, RunStatus, ViewType

from mlflow_tg.tracking import HISTORY_ARTIFACT

CONFIG_ID_TAG = "mlflow_tg.config_id"


class RunNotFoundError(LookupError):
    """An experiment or run that is not in the tracking store, or a run without history."""


@dataclass
class RunRecord:
    """What the predictor needs of one training run."""

    run_id: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric
    status: str
    history: list[dict[str, float]]  # one row per epoch, with "epoch"

    @property
    def group(self) -> str:
        """Training configuration without the seed: seed-twins share it."""
        return self.tags.get(CONFIG_ID_TAG, self.run_id)

    @property
    def epochs_logged(self) -> int:
        """How many epochs (counting the initialisation) the history holds."""
        return len(self.history)


def read_history(client: MlflowClient, run_id: str) -> list[dict[str, float]]:
    """The run's per-epoch metrics, from its ``history.parquet``."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, HISTORY_ARTIFACT, tmp)
        except Exception as error:  # MLflow raises several types for a missing artifact
            raise RunNotFoundError(
                f"run {run_id} has no {HISTORY_ARTIFACT} artifact ({error}); only runs of "
                "mlflow_tg's train.py have one."
            ) from error
        return pl.read_parquet(Path(path)).sort("epoch").to_dicts()


def record(client: MlflowClient, run: Run) -> RunRecord:
    """A RunRecord from a run found by search or by id."""
    return RunRecord(
        run_id=run.info.run_id,
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
        status=run.info.status,
        history=read_history(client, run.info.run_id),
    )


def load_run(client: MlflowClient, run_id: str) -> RunRecord:
    """One run, running or finished."""
    try:
        run = client.get_run(run_id)
    except Exception as error:
        raise RunNotFoundError(
            f"run {run_id!r} is not in the tracking store {client.tracking_uri}: {error}"
        ) from error
    return record(client, run)


def load_runs(
    client: MlflowClient,
    experiment: str,
    status: str = RunStatus.to_string(RunStatus.FINISHED),
    threads: int = 8,
) -> list[RunRecord]:
    """Every run of ``experiment`` with the given status, histories included."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments(view_type=ViewType.ALL)]
        raise RunNotFoundError(
            f"experiment {experiment!r} is not in the tracking store {client.tracking_uri}; it "
            f"has {names}. Make a population first: python train.py -m +experiment=population"
        )
    runs, token = [], None
    while True:
        page = client.search_runs(
            [found.experiment_id],
            filter_string=f"attributes.status = '{status}'",
            max_results=1000,
            page_token=token,
        )
        runs += page
        token = page.token
        if not token:
            break
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda run: record(client, run), runs))
