"""One MLflow run per training job: naming, params, tags, per-epoch metrics and the run's fate.

A run always ends in a final state: FINISHED, FAILED (the error kept in the ``mlflow_tg.error``
tag) or KILLED on Ctrl-C. Each epoch's metrics go out in one batch call, and the whole history
so far is rewritten as ``history.parquet``, so a reader needs one download per run, not one
request per metric key.
"""

from __future__ import annotations

import logging
import math
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import polars as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.entities import RunStatus
from omegaconf import DictConfig

from mlflow_tg import __version__, keys
from mlflow_tg.config import config_id, flatten

log = logging.getLogger(__name__)
MAX_TAG_LENGTH = 5000


def run_name(cfg: DictConfig) -> str:
    """A readable name such as ``resnet-w16-s0``."""
    return f"{cfg.model.name}-w{cfg.width}-s{cfg.seed}"


def use_tracking(tracking: DictConfig) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    mlflow.set_tracking_uri(tracking.uri)
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    location = None
    if tracking.get("artifact_root") and not str(tracking.uri).startswith("http"):
        location = Path(tracking.artifact_root).expanduser().resolve().as_uri()
    experiment_id = mlflow.create_experiment(
        tracking.experiment,
        artifact_location=location,
        tags={keys.EXPERIMENT_KIND: keys.EXPERIMENT_KIND_TRAINING},
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def description(cfg: DictConfig) -> str:
    """What the run trains, in one line of its MLflow description."""
    return (
        f"**{cfg.model.name}** width {cfg.width}, {cfg.optimizer.name} lr {cfg.optimizer.lr}, "
        f"{cfg.epochs} epochs on {cfg.data.name}, seed {cfg.seed}"
    )


def git_commit() -> str:
    """The commit of the checkout this package runs from, or ``unknown``."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hydra_tags() -> tuple[dict[str, str], Path | None]:
    """Tags describing the Hydra job (overrides, sweep) and its ``.hydra`` folder, if any."""
    if not HydraConfig.initialized():
        return {}, None
    hydra = HydraConfig.get()
    tags = {keys.OVERRIDES: " ".join(hydra.overrides.task) or "(none)"}
    if hydra.mode == RunMode.MULTIRUN:
        tags[keys.SWEEP] = str(hydra.sweep.dir)
        tags[keys.SWEEP_JOB] = str(hydra.job.num)
    hydra_dir = Path(hydra.runtime.output_dir) / hydra.output_subdir
    return tags, hydra_dir if hydra_dir.is_dir() else None


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics whose value is finite, as floats (MLflow stores no NaN or infinity)."""
    return {key: float(value) for key, value in metrics.items() if math.isfinite(value)}


@dataclass
class RunLogger:
    """Logs one run's per-epoch metrics and keeps the history table in step with them."""

    run_id: str
    history: list[dict[str, float]] = field(default_factory=list)
    note: list[str] = field(default_factory=list)  # the run's description, line by line

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log finite metrics at ``step=epoch`` in one call and rewrite ``history.parquet``."""
        finite = finite_metrics(metrics)
        mlflow.log_metrics(finite, step=epoch, run_id=self.run_id)
        self.history.append({"epoch": epoch, **finite})
        self.log_table(pl.DataFrame(self.history, infer_schema_length=None), keys.HISTORY)

    def log_final(self, metrics: dict[str, float], step: int) -> None:
        """Log end-of-run metrics (test loss and accuracy) at the last epoch."""
        mlflow.log_metrics(finite_metrics(metrics), step=step, run_id=self.run_id)

    def log_table(self, table: pl.DataFrame, artifact_path: str) -> None:
        """Write ``table`` as parquet at ``artifact_path`` in the run's artifacts."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_path).name
            table.write_parquet(path)
            folder = str(Path(artifact_path).parent)
            mlflow.log_artifact(str(path), None if folder == "." else folder, run_id=self.run_id)

    def log_figure(self, figure: Any, artifact_path: str) -> None:
        """Log a matplotlib figure as an image artifact."""
        mlflow.MlflowClient().log_figure(self.run_id, figure, artifact_path)

    def describe(self, line: str) -> None:
        """Add a line to the run's description (MLflow's run note, shown on the run page)."""
        self.note.append(line)
        self.set_tag(keys.NOTE, "  \n".join(self.note))  # markdown: two spaces break a line

    def set_tag(self, key: str, value: Any) -> None:
        """Set a run tag, truncated to a length every MLflow backend accepts."""
        mlflow.MlflowClient().set_tag(self.run_id, key, str(value)[:MAX_TAG_LENGTH])


@contextmanager
def tracked_run(cfg: DictConfig) -> Iterator[RunLogger]:
    """Start the run, log params and tags, and always end it in a final state."""
    use_tracking(cfg.tracking)
    tags, hydra_dir = hydra_tags()
    tags |= {
        keys.VERSION: __version__,
        keys.GIT_COMMIT: git_commit(),
        keys.CONFIG_ID: config_id(cfg),
    }
    run = mlflow.start_run(run_name=run_name(cfg), tags=tags)
    logger = RunLogger(run.info.run_id)
    try:
        logger.describe(description(cfg))
        mlflow.log_params({key: str(value) for key, value in flatten(cfg).items()})
        if hydra_dir is not None:
            mlflow.log_artifacts(str(hydra_dir), keys.HYDRA_DIR)
        yield logger
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as error:
        try:
            logger.set_tag(keys.ERROR, f"{type(error).__name__}: {error}")
        finally:  # the run ends FAILED even when the store refuses the tag
            mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
