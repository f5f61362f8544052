"""MLflow's SQLite store, read and written for ``mlflow-tg predict`` without importing MLflow.

``import mlflow`` alone takes 1.3 to 2 s of CPU, more than a command meant to run per run of a
sweep may take in all. On a local SQLite store the command reads, with ``sqlite3``:
- the run: its lifecycle stage, params, tags, latest metrics and the ``history.parquet`` in its
  local artifact folder;
- the registered version an alias names: its tags and its local artifact folder.

It writes the prediction as MLflow's ``log_batch`` does, in one transaction:
- a row per metric in ``metrics`` (NaN stored as 0 with ``is_nan``, ±inf as the largest float);
- ``latest_metrics`` updated where the new value is the latest by (step, timestamp, value);
- the tags inserted or updated, each cut to MLflow's limit on a tag's length, as MLflow cuts it.

Anything else raises ``Unsupported`` before a row is written, and the command goes through
MLflow's client instead: another kind of URI, a file that is not there or not a database,
tables without the columns read or written here, settings of MLflow's that change what it
reads or writes (workspaces, a separate registry URI, long values refused, an active logged
model), the alias ``latest``, a run's artifacts that are not local files, or a version without
its answerer artifact. A write that fails (a lock held past 30 s, a read-only file) is a
``StoreError``, with nothing written.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow_tg import keys
from mlflow_tg.tracking.records import (
    RunNotFoundError,
    RunRecord,
    StoreError,
    Unsupported,
    Version,
    history_rows,
    no_version,
)

SCHEME = "sqlite:///"
# the columns read or written of each table; a store without them is not read here
COLUMNS = {
    "runs": {"run_uuid", "lifecycle_stage", "artifact_uri"},
    "params": {"key", "value", "run_uuid"},
    "tags": {"key", "value", "run_uuid"},
    "metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
    "latest_metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
    "registered_model_aliases": {"alias", "version", "name"},
    "model_versions": {"name", "version", "storage_location", "current_stage"},
    "model_version_tags": {"key", "value", "name", "version"},
}
WRITTEN = ("tags", "metrics", "latest_metrics")
MAX_TAG_VALUE = 8000  # MLflow's limit on a run tag's value
LARGEST = 1.7976931348623157e308  # what MLflow stores for ±inf
DELETED = "Deleted_Internal"  # the stage of a model version MLflow has deleted
LATEST = "latest"  # an alias MLflow resolves itself: the newest version


def sqlite_path(uri: str) -> Path | None:
    """A ``sqlite:///`` URI's file (relative to here, as SQLAlchemy takes it); else None."""
    if not uri.startswith(SCHEME):
        return None
    path = uri[len(SCHEME) :].split("?", 1)[0]
    return Path(url2pathname(path)) if path and path != ":memory:" else None


def missing_store(uri: str) -> Path | None:
    """The missing file of a ``sqlite:///`` URI (MLflow would make a store there), or None."""
    path = sqlite_path(uri)
    return None if path is None or path.is_file() else path


def local_path(uri: str | None) -> Path:
    """The local folder of an artifact URI (``file:`` or a plain path); Unsupported otherwise.

    Percent-escapes decoded in both forms, as MLflow's ``local_file_uri_to_path``.
    """
    parsed = urlparse(uri or "")
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path))
    if uri and not parsed.scheme and Path(uri).is_absolute():
        return Path(url2pathname(uri))
    raise Unsupported(f"artifacts at {uri!r} are not local files")


def stored(value: float) -> tuple[float, bool]:
    """A metric value as MLflow stores it, and whether it is NaN."""
    if math.isnan(value):
        return 0.0, True
    return (math.copysign(LARGEST, value) if math.isinf(value) else value), False


def mlflow_settings_unsupported(uri: str) -> str | None:
    """Why MLflow's settings in the environment make it read or write otherwise; None if not."""
    environ = os.environ
    if environ.get("MLFLOW_WORKSPACE") or environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in (
        "true",
        "1",
    ):
        return "MLflow workspaces are on"
    if environ.get("MLFLOW_REGISTRY_URI", uri) != uri:
        return "the registry is another store (MLFLOW_REGISTRY_URI)"
    if environ.get("MLFLOW_TRUNCATE_LONG_VALUES", "true").lower() in ("false", "0"):
        return "MLflow refuses long values (MLFLOW_TRUNCATE_LONG_VALUES)"
    if environ.get("MLFLOW_ACTIVE_MODEL_ID"):
        return "metrics go to an active logged model too (MLFLOW_ACTIVE_MODEL_ID)"
    return None


class SqliteStore:
    """One SQLite store file, read and written as MLflow's ``SqlAlchemyStore`` does."""

    def __init__(self, path: Path, uri: str) -> None:
        self.path, self.uri = path, uri
        self.workspaces = self.check_schema()  # the tables that have MLflow's workspaces

    @classmethod
    def open(cls, uri: str) -> SqliteStore:
        """The store of a ``sqlite:///`` URI whose file exists; Unsupported otherwise."""
        if not uri.startswith(SCHEME) or "?" in uri:
            raise Unsupported(f"{uri!r} is not a plain sqlite:/// URI")
        reason = mlflow_settings_unsupported(uri)
        if reason:
            raise Unsupported(reason)
        path = sqlite_path(uri)
        if path is None or not path.is_file():
            raise Unsupported(f"{path} does not exist yet")
        return cls(path, uri)

    def connect(self) -> sqlite3.Connection:
        """A connection that waits for other writers, in autocommit (explicit transactions)."""
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def read(self, query: str, arguments: tuple = ()) -> list[tuple]:
        """The rows of one query; Unsupported when the file cannot be read as a store."""
        try:
            with closing(self.connect()) as db:
                return db.execute(query, arguments).fetchall()
        except sqlite3.Error as error:  # not a database, locked past the timeout, unreadable
            raise Unsupported(f"{self.path}: {error}") from error

    def check_schema(self) -> set[str]:
        """Unsupported unless every table has its columns; the tables with workspaces.

        A written table with a further required column (NOT NULL, no default) is unsupported
        too: a row written here would lack it.
        """
        workspaces = set()
        for table, needed in COLUMNS.items():
            columns = self.read(f"PRAGMA table_info({table})")
            names = {column[1] for column in columns}
            if not needed <= names:
                raise Unsupported(f"table {table} lacks {sorted(needed - names)}")
            required = {column[1] for column in columns if column[3] and column[4] is None}
            if table in WRITTEN and required - needed:
                raise Unsupported(f"table {table} requires {sorted(required - needed)}")
            if "workspace" in names:
                workspaces.add(table)
        return workspaces

    def in_default_workspace(self, table: str, alias: str = "") -> str:
        """The condition keeping ``table``'s rows of MLflow's default workspace, if it has any."""
        column = f"{alias}.workspace" if alias else "workspace"
        return f" AND {column} = 'default'" if table in self.workspaces else ""

    def record(self, run_id: str) -> RunRecord:
        """The run with its history; RunNotFoundError when the run is not in the store."""
        found = self.read("SELECT artifact_uri FROM runs WHERE run_uuid = ?", (run_id,))
        if not found:
            raise RunNotFoundError(f"run {run_id!r} is not in the tracking store {self.uri}")
        history = local_path(found[0][0]) / keys.HISTORY
        if not history.is_file():  # not a train.py run, or an artifact layout MLflow knows
            raise Unsupported(f"run {run_id}: no {history}")

        def pairs(table: str, what: str) -> list[tuple]:
            return self.read(f"SELECT {what} FROM {table} WHERE run_uuid = ?", (run_id,))

        metrics = {
            key: math.nan if is_nan else value
            for key, value, is_nan in pairs("latest_metrics", "key, value, is_nan")
        }
        params, tags = dict(pairs("params", "key, value")), dict(pairs("tags", "key, value"))
        return RunRecord(run_id, params, tags, metrics, history_rows(history, run_id))

    def registered(self) -> dict[str, list[str]] | None:
        """Each registered model that has a version, with its aliases; None if unreadable."""
        try:
            names = self.read(
                "SELECT DISTINCT name FROM model_versions WHERE current_stage != ?"
                + self.in_default_workspace("model_versions"),
                (DELETED,),
            )
            aliases = self.read(
                "SELECT name, alias FROM registered_model_aliases WHERE 1 = 1"
                + self.in_default_workspace("registered_model_aliases")
            )
        except Unsupported:
            return None
        held: dict[str, list[str]] = {name: [] for (name,) in names}
        for name, alias in aliases:
            held.setdefault(name, []).append(alias)
        return held

    def version(self, name: str, alias: str) -> Version:
        """The version ``alias`` names; RegistryError when the model or the alias does not exist.

        Its folder is None when its files are not local: an endpoint can still answer for it.
        """
        if alias.lower() == LATEST:
            raise Unsupported(f"the alias {alias!r} is MLflow's own")
        found = self.read(
            "SELECT a.version, v.storage_location FROM registered_model_aliases a "
            "JOIN model_versions v ON v.name = a.name AND v.version = a.version"
            + (" AND v.workspace = a.workspace" if "model_versions" in self.workspaces else "")
            + " WHERE a.name = ? AND a.alias = ? AND v.current_stage != ?"
            + self.in_default_workspace("registered_model_aliases", "a"),
            (name, alias, DELETED),
        )
        if not found:
            raise no_version(self.uri, name, alias, self.registered())
        version, location = found[0]
        tags = self.read(
            "SELECT key, value FROM model_version_tags WHERE name = ? AND version = ?"
            + self.in_default_workspace("model_version_tags"),
            (name, version),
        )
        try:
            folder = local_path(location)
        except Unsupported:
            folder = None
        return Version(name, int(version), dict(tags), folder)

    def log(
        self, run_id: str, metrics: Mapping[str, float], step: int, tags: Mapping[str, str]
    ) -> None:
        """Metrics at ``step`` and tags, in one transaction, as MLflow's ``log_batch``.

        RunNotFoundError for a run that is gone or deleted; StoreError when the write fails.
        Either way nothing is written.
        """
        tags = {key: value[:MAX_TAG_VALUE] for key, value in tags.items()}  # as MLflow cuts them
        now = int(time.time() * 1000)
        try:
            with closing(self.connect()) as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    self.check_active(db, run_id)
                    for key, value in metrics.items():
                        self.log_metric(db, run_id, key, value, now, step)
                    db.executemany(
                        "INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?) "
                        "ON CONFLICT (key, run_uuid) DO UPDATE SET value = excluded.value",
                        [(key, value, run_id) for key, value in tags.items()],
                    )
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except sqlite3.Error as error:
            raise StoreError(
                f"could not log the prediction to run {run_id} in {self.uri}: {error}; nothing "
                "was written"
            ) from error

    def check_active(self, db: sqlite3.Connection, run_id: str) -> None:
        """RunNotFoundError unless the run is in the store and not deleted (MLflow's check)."""
        stage = db.execute(
            "SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)
        ).fetchone()
        if stage is None or stage[0] != "active":
            raise RunNotFoundError(
                f"run {run_id} cannot be logged to: it is "
                f"{'not in the store' if stage is None else stage[0]} ({self.uri}); restore a "
                f"deleted run first: mlflow runs restore --run-id {run_id}"
            )

    @staticmethod
    def log_metric(
        db: sqlite3.Connection, run_id: str, key: str, value: float, now: int, step: int
    ) -> None:
        """One metric row, and the run's latest value of ``key`` if this one is later."""
        value, is_nan = stored(value)
        db.execute(  # the same row twice is one row, as MLflow's retry after a conflict makes it
            "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (key, value, now, run_id, step, is_nan),
        )
        latest = db.execute(
            "SELECT step, timestamp, value FROM latest_metrics WHERE key = ? AND run_uuid = ?",
            (key, run_id),
        ).fetchone()
        if latest is None:
            db.execute(
                "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, value, now, step, is_nan, run_id),
            )
        elif (step, now, value) > (latest[0], latest[1] or 0, latest[2]):
            db.execute(
                "UPDATE latest_metrics SET value = ?, timestamp = ?, step = ?, is_nan = ? "
                "WHERE key = ? AND run_uuid = ?",
                (value, now, step, is_nan, key, run_id),
            )
