"""Where ``mlflow-tg predict`` reads a run and a version, asks the predictor, and logs the answer.

Three stores with one interface (``record``, ``version``, ``log``), chosen by the tracking URI:
- a tracking server with ``--endpoint``: ``rest.Server``, plain HTTP;
- a local SQLite store: ``tracking.sqlite.SqliteStore``, plain ``sqlite3``;
- anything else, and whatever those two meet that they do not handle (``Unsupported``):
  ``MlflowStore``, MLflow's client.

The first two import neither MLflow nor torch, so that the command takes about a second.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from mlflow_tg.errors import Refusal
from mlflow_tg.tracking.records import RunRecord, Unsupported, Version, no_version

if TYPE_CHECKING:
    import pandas as pd


class Store(Protocol):
    """What ``mlflow-tg predict`` needs of a store."""

    def record(self, run_id: str) -> RunRecord:
        """The run with its history; RunNotFoundError (or the store's own) when it lacks one."""

    def version(self, model: str, alias: str) -> Version:
        """The version ``alias`` names; RegistryError (or the store's own) when there is none.

        Not asked of the store read with ``--endpoint``: the endpoint answers for its version.
        """

    def log(
        self, run_id: str, metrics: Mapping[str, float], step: int, tags: Mapping[str, str]
    ) -> None:
        """Metrics at ``step`` and tags, all or none."""


class MlflowStore:
    """Any store MLflow's client reads, and a registered version loaded as a pyfunc model."""

    def __init__(self, uri: str, verbose: bool = False) -> None:
        import mlflow

        mlflow.set_tracking_uri(uri)  # models:/ URIs resolve through the global registry URI
        self.client, self.verbose = mlflow.MlflowClient(), verbose

    def record(self, run_id: str) -> RunRecord:
        """The run with its history."""
        from mlflow_tg.tracking.runs import load_run

        return load_run(self.client, run_id)

    def version(self, model: str, alias: str) -> Version:
        """The version ``alias`` names; RegistryError when there is none."""
        from mlflow_tg.predictor.registry import version_by_alias

        found = version_by_alias(self.client, model, alias)
        if found is None:
            raise no_version(self.client.tracking_uri, model, alias, self.registered())
        return Version(model, int(found.version), dict(found.tags))

    def registered(self) -> dict[str, list[str]] | None:
        """Each registered model with its aliases (the first 1,000); None if unreadable."""
        try:
            models = self.client.search_registered_models(max_results=1000)
        except Exception:  # only to name what there is in an error: never an error of its own
            return None
        return {model.name: list(model.aliases) for model in models if model.latest_versions}

    def answer(self, version: Version, frame: pd.DataFrame) -> dict[str, Any]:
        """The version's answer for one run's rows, loaded as MLflow loads it."""
        from mlflow.exceptions import MlflowException

        from mlflow_tg.predictor.scoring import REFUSED, input_columns, load_run_predictor

        model = load_run_predictor(str(version), check_requirements=self.verbose)
        declared = set(input_columns(model))  # the other metrics of the history are not read
        try:
            (answer,) = model.predict(frame[[c for c in frame if c in declared]]).to_dict("records")
        except MlflowException as error:
            if error.error_code != REFUSED:
                raise
            raise Refusal(error.message) from None
        return answer

    def log(
        self, run_id: str, metrics: Mapping[str, float], step: int, tags: Mapping[str, str]
    ) -> None:
        """Metrics at ``step`` and tags, in one ``log_batch``."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(key, value, now, step) for key, value in metrics.items()],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )


def open_store(uri: str, endpoint: str | None, verbose: bool) -> Store:
    """The store to read ``uri`` with: without MLflow where it can, MLflow's client otherwise.

    ``verbose`` asks for MLflow's logs, warnings and its check of the version's requirements,
    so it takes MLflow's client.
    """
    if verbose:
        return MlflowStore(uri, verbose)
    if uri.startswith(("http://", "https://")):
        if endpoint:
            from mlflow_tg.serve.rest import Server

            return Server(uri)
        return MlflowStore(uri, verbose)  # the version's artifacts come through the server
    from mlflow_tg.tracking.sqlite import SqliteStore

    try:
        return SqliteStore.open(uri)
    except Unsupported:
        return MlflowStore(uri, verbose)


def answer_here(store: Store, version: Version, run: RunRecord, rows: list[dict]) -> dict:
    """The version's answer for ``run`` (its ``rows``), computed in this process.

    From the version's own answerer artifact where its files are local, without MLflow;
    Unsupported for a version logged before versions carried one.
    """
    from mlflow_tg.predictor.answering import ANSWERER, RunAnswerer, model_input

    frame = model_input(rows, run.params, run.run_id)
    if isinstance(store, MlflowStore):
        return store.answer(version, frame)
    artifacts = version.artifacts()
    if ANSWERER not in artifacts:
        raise Unsupported(f"{version} has no {ANSWERER} artifact")
    try:
        answerer = RunAnswerer.load(artifacts)
    except Exception as error:  # files gone, pickled by other code, a CatBoost file unreadable
        raise Unsupported(f"{version}: its answerer cannot be loaded here ({error!r})") from error
    return answerer.answer(answerer.request(frame)).to_dict("records")[0]
