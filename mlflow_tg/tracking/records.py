"""Runs and registered versions as read back from any store, with MLflow left out.

Shared by MLflow's client (``runs.py``) and by the readers of ``mlflow-tg predict`` that must
not import MLflow: a local SQLite store (``sqlite.py``) and a tracking server's REST API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow_tg import keys
from mlflow_tg.errors import RegistryError, shown_uri

EMBEDDED_URI = "sqlite:///mlflow.db"  # conf/tracking/local.yaml: the store in the current folder
SERVER_URI = "http://127.0.0.1:5000"  # conf/tracking/server.yaml: the server of make server-start


class RunNotFoundError(LookupError):
    """An experiment or run that is not in the tracking store, or a run without history."""


class CorruptHistoryError(RunNotFoundError):
    """A run whose ``history.parquet`` is there but cannot be read (a damaged file)."""


@dataclass
class RunRecord:
    """What the predictor needs of one training run."""

    run_id: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric
    # one row per epoch, with "epoch"; None: no history artifact, or not read (no final TARGET)
    history: list[dict[str, float]] | None
    history_error: str | None = None  # why history.parquet could not be read (left out)

    @property
    def group(self) -> str:
        """Training configuration without the seed: seed-twins share it."""
        return self.tags.get(keys.CONFIG_ID, self.run_id)


class StoreError(LookupError):
    """A store that cannot be reached or written (nothing written), or is not where it is said."""


class Unsupported(Exception):
    """A store, run or version that a reader without MLflow does not handle: MLflow's does."""


@dataclass(frozen=True)
class Version:
    """A registered model version, and the local folder of its logged model."""

    name: str
    version: int
    tags: dict[str, str]
    folder: Path | None = None  # of the logged model (MLmodel, artifacts), where it is local

    def __str__(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def artifacts(self) -> dict[str, str]:
        """The logged model's artifacts (name → local path), as its ``MLmodel`` lists them."""
        import yaml

        if self.folder is None:
            raise Unsupported(f"{self}: its artifacts are not local files")
        try:
            spec = yaml.safe_load((self.folder / "MLmodel").read_text())
            listed = spec["flavors"]["python_function"].get("artifacts") or {}
        except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
            raise Unsupported(f"{self}: its MLmodel cannot be read here ({error!r})") from error
        return {name: str(self.folder / entry["path"]) for name, entry in listed.items()}


def history_rows(path: Path, run_id: str) -> list[dict[str, float]]:
    """The ``history.parquet`` at ``path``, a row per epoch; CorruptHistoryError if damaged."""
    import polars as pl  # here: the plain-HTTP path of mlflow-tg predict reads it with pyarrow

    try:
        return pl.read_parquet(path).sort(keys.EPOCH).to_dicts()
    except (pl.exceptions.PolarsError, OSError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CorruptHistoryError(
            f"run {run_id}: its artifact {keys.HISTORY} cannot be read ({reason}). "
            "train.py rewrites it every epoch, so the copy in the store is damaged (an "
            "upload cut short, a full disk) and the run's history is lost to the predictor; "
            f"inspect it with: mlflow artifacts download --run-id {run_id} "
            f"--artifact-path {keys.HISTORY}"
        ) from error


def pointing_at(uri: str) -> str:
    """The override that points ``train.py`` or the predictor at ``uri`` ("" for the default).

    Shown in messages, so without the password the URI may carry.
    """
    if uri == EMBEDDED_URI:
        return ""
    shown = shown_uri(uri)
    return " tracking=server" if uri.rstrip("/") == SERVER_URI else f" tracking.uri={shown}"


def no_version(
    store: str, name: str, alias: str, held: Mapping[str, Sequence[str]] | None = None
) -> RegistryError:
    """The error for a model or alias that the registry lacks.

    ``held``: each registered model's aliases, when the store could list them; the error then
    names what there is, since a misspelt name needs no new fit.
    """
    missing = f"the registry of {shown_uri(store)} has no model {name!r} with alias {alias!r}"
    fit = f"python -m mlflow_tg.predictor{pointing_at(store)}"
    if name != keys.REGISTERED_MODEL:
        fit += f" registered_model={name}"
    elsewhere = (
        "or, to predict without this registry, ask a model served elsewhere: "
        "mlflow-tg predict --endpoint URL"
    )
    if not held:
        return RegistryError(f"{missing}; fit one there first: {fit}, {elsewhere}")
    if name in held and not held[name]:
        return RegistryError(
            f"{missing}: no alias of {name} names a version. Set one (the model's page in the "
            f"MLflow UI, or MlflowClient().set_registered_model_alias), fit a version, which "
            f"sets {keys.CHAMPION}: {fit}, {elsewhere}"
        )
    if name in held:
        return RegistryError(
            f"{missing}: the aliases of {name} are {', '.join(sorted(held[name]))}. Give one "
            f"with --alias, {elsewhere}"
        )
    listing = "; ".join(f"{model} ({aliases_text(held[model])})" for model in sorted(held))
    return RegistryError(
        f"{missing}: it holds {listing}. Give one of them with --model (and --alias), fit "
        f"{name} there: {fit}, {elsewhere}"
    )


def aliases_text(aliases: Sequence[str]) -> str:
    """A model's aliases, in brackets after its name."""
    return f"aliases {', '.join(sorted(aliases))}" if aliases else "no alias"
