"""One MLflow run per training job: naming, params, tags, per-epoch metrics and the run's fate.

A run always ends in a final state: FINISHED, FAILED (the error kept in the ``mlflow_tg.error``
tag) or KILLED on Ctrl-C or SIGTERM (``timeout``, ``docker stop``, a scheduler; the process then
exits 143). Each epoch's metrics go out in one batch call, and the whole history
so far is rewritten as ``history.parquet``, so a reader needs one download per run, not one
request per metric key. Writes pass through the run's spool (``spool.py``): a tracking server
that goes away delays them and never stops training; the spool's thread also keeps the run's
heartbeat, which ``mlflow-tg reap`` reads (``reap.py``).
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import polars as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    RESOURCE_ALREADY_EXISTS,
    TEMPORARILY_UNAVAILABLE,
    ErrorCode,
)
from omegaconf import DictConfig

from mlflow_tg import __version__, keys
from mlflow_tg.config import config_id, flatten
from mlflow_tg.errors import ConfigError, shown_uri
from mlflow_tg.tracking import sweep
from mlflow_tg.tracking.health import (
    SERVER_PROBE_S,
    database_refused,
    unanswered,
    unreachable_database,
)
from mlflow_tg.tracking.spool import (
    MAX_TAG_LENGTH,
    Hurry,
    Spool,
    merged_note,
    now_iso,
    server_answers,
)
from mlflow_tg.tracking.sqlite import sqlite_path

log = logging.getLogger(__name__)
ALREADY_EXISTS = ErrorCode.Name(RESOURCE_ALREADY_EXISTS)
SPOOL_DIR = "spool"  # in a Hydra job's output folder: the run's journal of writes
# A SIGTERM leaves seconds before the SIGKILL (`docker stop`: 10 s, SLURM's KillWait: 30 s): a
# run being killed waits at most this long for an absent server before it journals its end.
KILLED_DRAIN_S = 5.0
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}


class Terminated(BaseException):  # like KeyboardInterrupt: no `except Exception` stops it
    """The job got SIGTERM: its run ends KILLED and the process exits ``128 + signum``."""

    def __init__(self, signum: int = signal.SIGTERM, outcome: str = "the run ended KILLED") -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum
        self.outcome = outcome  # what became of the run, for the last message

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal (143 for SIGTERM)."""
        return 128 + self.signum


def run_name(cfg: DictConfig) -> str:
    """A readable name such as ``resnet-w16-s0``."""
    return f"{cfg.model.name}-w{cfg.width}-s{cfg.seed}"


def use_tracking(tracking: DictConfig) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id.

    A tracking server must answer first (ConfigError naming it otherwise, within about
    ``SERVER_PROBE_S`` seconds, not MLflow's minutes of retries). A SQLite store is created,
    and the experiment found or created, under an exclusive lock on ``<db>.lock``: jobs started
    at once on a store that does not exist yet would race in MLflow's table creation and leave
    the file half-built.
    """
    connect(tracking)
    return use_experiment(tracking)


def connect(tracking: DictConfig) -> str:
    """Point MLflow at the configured store, once a tracking server answers; the URI."""
    uri = str(tracking.uri)
    if uri.startswith(("http://", "https://")):
        check_tracking_server(uri)
    elif (why := unreachable_database(uri)) is not None:
        raise ConfigError(database_refused(uri, why, "tracking.uri="))
    mlflow.set_tracking_uri(uri)
    return uri


def use_experiment(tracking: DictConfig) -> str:
    """Find or create the experiment (under the store's lock) and make it the active one."""
    with sqlite_lock(str(tracking.uri)):
        return found_or_created(tracking)


def found_or_created(tracking: DictConfig) -> str:
    """The experiment's id, created if it is not there yet; it becomes the active one."""
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    location = None
    if tracking.get("artifact_root") and not str(tracking.uri).startswith("http"):
        location = Path(tracking.artifact_root).expanduser().resolve().as_uri()
    try:
        experiment_id = mlflow.create_experiment(
            tracking.experiment,
            artifact_location=location,
            tags={keys.EXPERIMENT_KIND: keys.EXPERIMENT_KIND_TRAINING},
        )
    except MlflowException as error:  # another job (on a tracking server) created it first
        if error.error_code != ALREADY_EXISTS:
            raise
        experiment_id = mlflow.get_experiment_by_name(tracking.experiment).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextmanager
def sqlite_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<db>.lock`` for a SQLite store, and create the store in it.

    Processes on one machine (or one local file system) queue here; MLflow creates and
    migrates the tables when it first opens a store, which the first job does alone.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates the tables
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_tracking_server(uri: str, timeout_s: float = SERVER_PROBE_S) -> None:
    """ConfigError unless the tracking server at ``uri`` answers ``/health`` within ``timeout_s``.

    TLS follows MLflow's own settings (``MLFLOW_TRACKING_INSECURE_TLS``,
    ``MLFLOW_TRACKING_SERVER_CERT_PATH``).
    """
    why = unanswered(uri, timeout_s)
    if why is None:
        return
    raise ConfigError(
        f"tracking.uri={shown_uri(uri)!r}: no MLflow tracking server answers there ({why}). "
        "Start it (make server-start: PostgreSQL and mlflow server on http://127.0.0.1:5000, "
        "the address of tracking=server), point tracking.uri at a running one, or train on "
        "the embedded store: tracking=local."
    )


def run_params(cfg: DictConfig) -> dict[str, str]:
    """The run's params: its resolved config flattened to dotted keys, values as text."""
    return {key: str(value) for key, value in flatten(cfg).items()}


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
    """Logs one run's per-epoch metrics and keeps the history table in step with them.

    With a ``spool`` (as ``tracked_run`` gives it), every write is journaled and delivered by
    the spool's courier, so training goes on through an outage; without, it is sent at once.
    """

    run_id: str
    history: list[dict[str, float]] = field(default_factory=list)
    note: list[str] = field(default_factory=list)  # the run's description, line by line
    spool: Spool | None = None
    spool_is_temporary: bool = False  # its folder goes once the store has everything
    left_in_spool: Path | None = None  # at the end: the store lacks part of the run, kept here

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log finite metrics at ``step=epoch`` in one call and rewrite ``history.parquet``."""
        finite = finite_metrics(metrics)
        self.log_metrics(finite, epoch)
        self.history.append({keys.EPOCH: epoch, **finite})
        self.log_table(pl.DataFrame(self.history, infer_schema_length=None), keys.HISTORY)

    def log_final(self, metrics: dict[str, float], step: int) -> None:
        """Log end-of-run metrics (test loss and accuracy) at the last epoch."""
        self.log_metrics(finite_metrics(metrics), step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Finite metrics at ``step``, in one request."""
        if self.spool is not None:
            self.spool.append("metrics", step=step, values=metrics)
        else:
            mlflow.log_metrics(metrics, step=step, run_id=self.run_id)

    def log_table(self, table: pl.DataFrame, artifact_path: str) -> None:
        """Write ``table`` as parquet at ``artifact_path`` in the run's artifacts."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_path).name
            table.write_parquet(path)
            self.log_file(path, artifact_path)

    def log_figure(self, figure: Any, artifact_path: str) -> None:
        """Log a matplotlib figure as an image artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_path).name
            figure.savefig(path)
            self.log_file(path, artifact_path)

    def log_file(self, path: Path, artifact_path: str) -> None:
        """Log a local file as the artifact ``artifact_path`` (its folder and name)."""
        folder = str(Path(artifact_path).parent)
        folder = None if folder == "." else folder
        if self.spool is not None:
            self.spool.add_file(path, folder)
        else:
            mlflow.log_artifact(str(path), folder, run_id=self.run_id)

    def describe(self, line: str) -> None:
        """Add a line to the run's description (MLflow's run note, shown on the run page).

        Lines others added meanwhile (``mlflow-tg predict``'s answer) are kept: the spool's
        delivery merges them in (``merged_note``), as this does when writing directly.
        """
        self.note.append(line)
        own = keys.NOTE_BREAK.join(self.note)
        if self.spool is not None:
            self.set_tag(keys.NOTE, own)
            return
        client = mlflow.MlflowClient()
        current = client.get_run(self.run_id).data.tags.get(keys.NOTE)
        client.set_tag(self.run_id, keys.NOTE, merged_note(own, current))

    def set_tag(self, key: str, value: Any) -> None:
        """Set a run tag, truncated to a length every MLflow backend accepts."""
        if self.spool is not None:
            self.spool.append("tag", key=key, value=str(value)[:MAX_TAG_LENGTH])
        else:
            mlflow.MlflowClient().set_tag(self.run_id, key, str(value)[:MAX_TAG_LENGTH])


class SigtermGuard:
    """While installed, SIGTERM raises Terminated in the main thread, once.

    A second SIGTERM while the run is being ended is noted, not raised, so that the run still
    reaches its final state; ``disarm`` before ending the run, ``pending`` says whether one came.
    """

    def __init__(self) -> None:
        self.armed, self.pending, self.previous = True, False, None

    def __enter__(self) -> SigtermGuard:
        try:  # only the main thread may install handlers; elsewhere SIGTERM stays as it was
            self.previous = signal.signal(signal.SIGTERM, self.handle)
        except ValueError:
            self.previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def handle(self, signum: int, frame: object) -> None:
        """Raise Terminated unless the run is already ending."""
        first = not self.pending
        self.pending = True
        if self.armed and first:
            raise Terminated(signum)
        log.warning("SIGTERM%s: the run is being ended first", "" if first else " again")

    def disarm(self) -> None:
        """From now on a SIGTERM is only noted."""
        self.armed = False


def end_run(guard: SigtermGuard, status: RunStatus, attempts: int = 5) -> None:
    """End the active run with ``status``; a SIGTERM meanwhile does not interrupt it.

    A store busy with another writer (SQLite: "database is locked") is retried with a growing
    wait: a run left RUNNING because a sweep-mate was writing would be lost to every reader.
    """
    guard.disarm()
    active, ended = mlflow.active_run(), RunStatus.to_string(status)
    if active is None:
        return
    for attempt in range(attempts):
        try:
            if attempt == 0:
                mlflow.end_run(ended)
            else:  # end_run let go of the run before its write failed: end it by id
                mlflow.MlflowClient().set_terminated(active.info.run_id, ended)
            return
        except MlflowException as error:
            if (
                error.error_code != ErrorCode.Name(TEMPORARILY_UNAVAILABLE)
                or attempt == attempts - 1
            ):
                raise
            log.warning("the store is busy (%s); ending the run again", error.message[:200])
            time.sleep(0.5 * 2**attempt)


def spool_folder(run_id: str) -> tuple[Path, bool]:
    """Where a run journals its writes, and whether the folder is a temporary one.

    A Hydra job keeps it in its output folder (``spool/``), beside its ``.hydra`` config, for
    ``mlflow-tg replay``; a run started from Python gets a temporary folder, removed once the
    store has everything.
    """
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir) / SPOOL_DIR, False
    return Path(tempfile.mkdtemp(prefix=f"mlflow_tg_spool.{run_id[:8]}.")), True


@contextmanager
def failing_fast() -> Iterator[None]:
    """MLflow's HTTP calls in this block try once, briefly: the server is known to be down."""
    saved = {name: os.environ.get(name) for name in FAIL_FAST}
    os.environ.update(FAIL_FAST)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def finish_run(logger: RunLogger, guard: SigtermGuard, status: RunStatus, timeout_s: float) -> str:
    """Deliver the run's journal, then end it with ``status``; say how the run ended.

    When the store is still away after ``timeout_s``, the run's end joins the journal and the
    folder is named for ``mlflow-tg replay``; the process goes on without waiting longer.
    """
    guard.disarm()
    spool = logger.spool
    ended = f"the run ended {RunStatus.to_string(status)}"
    if spool is None:
        end_run(guard, status)
        return ended
    started = time.monotonic()
    try:
        # a SIGTERM while the store is away (a scheduler's time limit) cuts the wait: a SIGKILL
        # may follow, and the run's end must be journaled before it
        delivered = spool.close(status, timeout_s, Hurry(lambda: guard.pending, KILLED_DRAIN_S))
    except (KeyboardInterrupt, Terminated):  # interrupted while waiting: ends as it was to
        end_run(guard, status)
        raise
    except BaseException:  # the store refused a write for good: the run ends, and lacks it
        end_run(guard, RunStatus.FAILED if status == RunStatus.FINISHED else status)
        raise
    if delivered or server_answers(spool.uri):
        end_run(guard, status)
        if delivered and logger.spool_is_temporary:
            shutil.rmtree(spool.folder, ignore_errors=True)
        if not delivered:
            logger.left_in_spool = spool.folder
            log.error("run %s ended %s, but some of its writes are only in %s",
                      logger.run_id, RunStatus.to_string(status), spool.folder)  # fmt: skip
        return ended
    with failing_fast(), suppress(Exception):  # forgets the active run; the server is down
        mlflow.end_run(RunStatus.to_string(status))
    logger.left_in_spool = spool.folder
    log.error(
        "the tracking server %s did not answer for %.0f s at the end of run %s: what it lacks "
        "of the run (its last metrics, artifacts and its end, %s) is kept in %s. Once the "
        "server is back, deliver it with: mlflow-tg replay %s",
        shown_uri(spool.uri), time.monotonic() - started, logger.run_id,
        RunStatus.to_string(status), spool.folder, spool.folder,
    )  # fmt: skip
    return (
        f"the run is still RUNNING on the server; its end ({RunStatus.to_string(status)}) "
        f"waits in {spool.folder} for mlflow-tg replay"
    )


@contextmanager
def tracked_run(cfg: DictConfig) -> Iterator[RunLogger]:
    """Start the run, log params and tags, and always end it in a final state.

    KILLED on Ctrl-C (KeyboardInterrupt) and on SIGTERM (Terminated, raised by the handler
    this installs for the run's duration; the tag ``mlflow_tg.killed_by`` names the signal).
    Writes go through a spool (``spool.py``): an outage of the tracking server delays them,
    and the end of the run waits up to ``tracking.drain_timeout_s`` for it to be over.
    """
    use_tracking(cfg.tracking)
    tags, hydra_dir = hydra_tags()
    tags |= {
        keys.VERSION: __version__,
        keys.GIT_COMMIT: git_commit(),
        keys.CONFIG_ID: config_id(cfg),
        keys.HEARTBEAT: now_iso(),
    }
    if cfg.get("prune") is not None and cfg.prune.get("sweep"):
        tags[keys.SWEEP] = str(cfg.prune.sweep)  # jobs launched apart, pruned as one sweep
    drain_s = float(cfg.tracking.get("drain_timeout_s", 600.0))
    with SigtermGuard() as guard:
        try:
            run = mlflow.start_run(run_name=run_name(cfg), tags=tags)
        except Terminated:  # the run may exist already: it must not stay RUNNING
            if mlflow.active_run() is not None:
                end_run(guard, RunStatus.KILLED)
            raise
        logger = RunLogger(run.info.run_id)
        try:
            folder, logger.spool_is_temporary = spool_folder(run.info.run_id)
            sweep.enrol(run.info.run_id, folder, mlflow.get_tracking_uri())
            heartbeat_s = float(cfg.tracking.get("heartbeat_s", 60.0))
            logger.spool = Spool(folder, run.info.run_id, mlflow.get_tracking_uri(),
                                 heartbeat_s).start()  # fmt: skip
            logger.describe(description(cfg))
            mlflow.log_params(run_params(cfg))
            if hydra_dir is not None:
                mlflow.log_artifacts(str(hydra_dir), keys.HYDRA_DIR)
            yield logger
        except (KeyboardInterrupt, Terminated) as stop:
            guard.disarm()
            try:
                name = "SIGINT" if isinstance(stop, KeyboardInterrupt) else "SIGTERM"
                logger.set_tag(keys.KILLED_BY, name)
            finally:  # the run ends KILLED even when the store refuses the tag
                outcome = finish_run(logger, guard, RunStatus.KILLED, min(drain_s, KILLED_DRAIN_S))
            if isinstance(stop, Terminated):
                stop.outcome = outcome
            raise
        except BaseException as error:
            guard.disarm()
            try:
                logger.set_tag(keys.ERROR, f"{type(error).__name__}: {error}")
            finally:  # the run ends FAILED even when the store refuses the tag
                finish_run(logger, guard, RunStatus.FAILED, drain_s)
            raise
        else:
            outcome = finish_run(logger, guard, RunStatus.FINISHED, drain_s)
        finally:  # the run has ended, or its end waits in the spool: no longer a lost worker's
            sweep.unenrol(run.info.run_id)
        if guard.pending:  # SIGTERM came while the run was ending: the process stops now
            raise Terminated(outcome=f"it came after the run's last epoch: {outcome}")
