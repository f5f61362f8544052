"""``mlflow-tg predict``'s own reader and writer of MLflow's SQLite store, against MLflow's client.

What it reads must be what MLflow's client reads, and what it writes must read back through
MLflow exactly as the same ``log_batch`` through MLflow's client does; anything it does not
handle is ``Unsupported`` before a row is written.
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import polars as pl
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from mlflow_tg import keys
from mlflow_tg.errors import RegistryError
from mlflow_tg.predictor.registry import version_by_alias
from mlflow_tg.serve.stores import MlflowStore
from mlflow_tg.tracking.records import RunNotFoundError, StoreError, Unsupported
from mlflow_tg.tracking.runs import load_run
from mlflow_tg.tracking.sqlite import SqliteStore

HISTORY = [{"epoch": e, "val_acc": 0.1 * e, "train_loss": 2.0 - 0.1 * e} for e in range(3)]


@pytest.fixture()
def store(tmp_path: Path) -> dict:
    """A SQLite store made by MLflow, with an experiment whose artifacts are local files."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("runs", artifact_location=str(tmp_path / "artifacts"))
    return {"uri": uri, "client": client, "experiment": experiment, "folder": tmp_path}


def new_run(store: dict, history: list[dict] | None = HISTORY) -> str:
    """A run with params, tags, metrics and (unless None) a history.parquet artifact."""
    client = store["client"]
    run_id = client.create_run(store["experiment"], run_name="a-run").info.run_id
    client.log_batch(
        run_id,
        metrics=[Metric("val_acc", 0.2, 1, 2), Metric("val_loss", math.nan, 1, 2)],
        tags=[RunTag("mlflow.note.content", "a note")],
    )
    client.log_param(run_id, "width", "3")
    if history is not None:
        path = store["folder"] / keys.HISTORY
        pl.DataFrame(history).write_parquet(path)
        client.log_artifact(run_id, str(path))
    return run_id


def comparable(value: float) -> float | str:
    return "nan" if math.isnan(value) else value


def logged(client: MlflowClient, run_id: str, keys_: list[str]) -> dict:
    """Everything MLflow's client reads back of a run's metrics and tags (timestamps aside)."""
    run = client.get_run(run_id)
    histories = {
        key: sorted((m.step, comparable(m.value)) for m in client.get_metric_history(run_id, key))
        for key in keys_
    }
    latest = {key: comparable(run.data.metrics[key]) for key in keys_}
    return {"histories": histories, "latest": latest, "tags": dict(run.data.tags)}


def test_a_run_reads_as_mlflows_client_reads_it(store):
    run_id = new_run(store)
    mine = SqliteStore.open(store["uri"]).record(run_id)
    theirs = load_run(store["client"], run_id)
    assert (mine.params, mine.history) == (theirs.params, theirs.history)
    assert mine.tags == theirs.tags and mine.history[-1]["val_acc"] == pytest.approx(0.2)
    assert mine.metrics["val_acc"] == theirs.metrics["val_acc"] == 0.2
    assert math.isnan(mine.metrics["val_loss"]) and math.isnan(theirs.metrics["val_loss"])


def test_a_logged_batch_reads_back_as_the_same_batch_logged_by_mlflow(store):
    client = store["client"]
    mine, theirs = new_run(store), new_run(store)
    names = ["val_acc", "a", "b", "c", "d"]
    batches = [  # a later step, then an earlier one: the latest value stays the later step's
        ({"val_acc": 0.7, "a": 0.25, "b": math.nan, "c": math.inf, "d": 1.0}, 3, {"t": "1"}),
        ({"val_acc": 0.9, "a": 0.5, "b": 0.1, "c": -math.inf, "d": 0.0}, 1, {"t": "2"}),
        (
            {"a": 0.125},
            3,
            {"mlflow.note.content": "a note  \nand a prediction", "long": "y" * 9000},
        ),
    ]
    sqlite_store = SqliteStore.open(store["uri"])
    for metrics, step, tags in batches:
        time.sleep(0.002)  # each batch a later millisecond than the last, in both runs
        sqlite_store.log(mine, metrics, step, tags)
        now = int(time.time() * 1000)
        client.log_batch(
            theirs,
            metrics=[Metric(key, value, now, step) for key, value in metrics.items()],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )
    expected = logged(client, theirs, names)
    assert logged(client, mine, names) == expected
    assert expected["latest"]["val_acc"] == 0.7 and expected["tags"]["t"] == "2"
    assert expected["latest"]["b"] == "nan" and expected["latest"]["c"] == 1.7976931348623157e308
    assert expected["latest"]["a"] == 0.125  # same step, later time: the later, smaller value
    assert expected["tags"]["long"] == "y" * 8000  # cut to MLflow's limit


def test_a_registered_version_reads_as_mlflows_registry_reads_it(store):
    client = store["client"]
    folder = store["folder"] / "model"
    folder.mkdir()
    client.create_registered_model("m")
    for _ in range(2):
        version = client.create_model_version("m", str(folder), tags={keys.KS_TAG: "1,2"})
    client.set_registered_model_alias("m", "champion", version.version)
    mine = SqliteStore.open(store["uri"]).version("m", "champion")
    theirs = version_by_alias(client, "m", "champion")
    assert (mine.version, mine.tags, mine.folder) == (2, dict(theirs.tags), folder)
    assert str(mine) == "models:/m/2"
    for name, alias in [("m", "challenger"), ("other", "champion")]:
        with pytest.raises(RegistryError, match=f"has no model '{name}' with alias '{alias}'"):
            SqliteStore.open(store["uri"]).version(name, alias)


def test_a_missing_model_or_alias_is_named_with_what_the_registry_holds(store):
    client = store["client"]
    client.create_registered_model("m")
    version = client.create_model_version("m", str(store["folder"]))
    client.set_registered_model_alias("m", "champion", version.version)
    client.create_registered_model("bare")
    client.create_model_version("bare", str(store["folder"]))
    sqlite_store, mlflows = SqliteStore.open(store["uri"]), MlflowStore(store["uri"])
    for reader in (sqlite_store, mlflows):  # both readers name the same
        with pytest.raises(RegistryError) as typo:
            reader.version("n", "champion")
        assert "it holds bare (no alias); m (aliases champion)" in str(typo.value)
        assert "registered_model=n" in str(typo.value)  # fitting it is the last suggestion
        with pytest.raises(RegistryError) as alias:
            reader.version("m", "best")
        assert "the aliases of m are champion. Give one with --alias" in str(alias.value)
        with pytest.raises(RegistryError, match=r"no alias of bare names a version\. Set one"):
            reader.version("bare", "champion")
    client.create_registered_model("empty")  # no version: nothing to serve, not listed
    with pytest.raises(RegistryError) as typo:
        mlflows.version("n", "champion")
    assert "empty" not in str(typo.value)


def test_a_run_not_in_the_store_is_named_and_one_without_history_left_to_mlflow(store):
    sqlite_store = SqliteStore.open(store["uri"])
    with pytest.raises(RunNotFoundError, match="run 'nope' is not in the tracking store"):
        sqlite_store.record("nope")
    with pytest.raises(Unsupported, match=keys.HISTORY):  # MLflow's client says what it lacks
        sqlite_store.record(new_run(store, history=None))


def test_percent_escapes_in_artifact_paths_are_decoded_as_mlflow_decodes_them(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("runs", artifact_location=str(tmp_path / "a%41b"))
    run_id = new_run({"client": client, "experiment": experiment, "folder": tmp_path})
    assert (tmp_path / "aAb").is_dir()  # where MLflow put the artifacts
    assert SqliteStore.open(uri).record(run_id).history == load_run(client, run_id).history


def test_a_deleted_run_is_not_logged_to_and_nothing_is_written(store):
    run_id = new_run(store)
    store["client"].delete_run(run_id)
    with pytest.raises(RunNotFoundError, match="it is deleted"):
        SqliteStore.open(store["uri"]).log(run_id, {"x": 1.0}, 1, {"t": "v"})
    run = store["client"].get_run(run_id)
    assert "x" not in run.data.metrics and "t" not in run.data.tags


def test_a_write_that_fails_half_way_writes_nothing(store):
    run_id = new_run(store)
    with sqlite3.connect(store["folder"] / "mlflow.db") as db:  # the tags come last
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON tags BEGIN "
                   "SELECT RAISE(ABORT, 'tags refused'); END")  # fmt: skip
    with pytest.raises(StoreError, match="tags refused; nothing was written"):
        SqliteStore.open(store["uri"]).log(run_id, {"x": 1.0}, 1, {"t": "v"})
    with sqlite3.connect(store["folder"] / "mlflow.db") as db:
        for table in ("metrics", "latest_metrics"):
            assert not db.execute(f"SELECT * FROM {table} WHERE key = 'x'").fetchall()


def test_what_it_does_not_handle_is_unsupported(store, tmp_path, monkeypatch):
    run_id = new_run(store)
    sqlite_store = SqliteStore.open(store["uri"])
    for uri in ["postgresql://u@h/db", "sqlite://", f"sqlite:///{tmp_path / 'none.db'}",
                store["uri"] + "?timeout=5"]:  # fmt: skip
        with pytest.raises(Unsupported):
            SqliteStore.open(uri)
    with sqlite3.connect(store["folder"] / "mlflow.db") as db:  # artifacts behind a server
        db.execute("UPDATE runs SET artifact_uri = 'mlflow-artifacts:/1/x' WHERE run_uuid = ?",
                   (run_id,))  # fmt: skip
    with pytest.raises(Unsupported, match="not local files"):
        sqlite_store.record(run_id)
    run_id = new_run(store)
    other = tmp_path / "other.db"  # a store of another schema
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE runs (run_uuid TEXT, status TEXT)")
    with pytest.raises(Unsupported, match=r"table runs lacks \['artifact_uri', 'lifecycle_stage'"):
        SqliteStore.open(f"sqlite:///{other}")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database, " * 100)
    with pytest.raises(Unsupported, match="not a database"):
        SqliteStore.open(f"sqlite:///{garbage}")
    with pytest.raises(Unsupported, match="MLflow's own"):
        sqlite_store.version("m", "Latest")
    settings = {
        "MLFLOW_ENABLE_WORKSPACES": ("true", "workspaces"),
        "MLFLOW_WORKSPACE": ("team", "workspaces"),
        "MLFLOW_REGISTRY_URI": (f"sqlite:///{other}", "MLFLOW_REGISTRY_URI"),
        "MLFLOW_TRUNCATE_LONG_VALUES": ("false", "MLFLOW_TRUNCATE_LONG_VALUES"),
        "MLFLOW_ACTIVE_MODEL_ID": ("m-1", "MLFLOW_ACTIVE_MODEL_ID"),
    }
    for name, (value, said) in settings.items():
        with monkeypatch.context() as patched:
            patched.setenv(name, value)
            with pytest.raises(Unsupported, match=said):
                SqliteStore.open(store["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store["uri"])  # the same store: fine
    assert SqliteStore.open(store["uri"]).record(run_id).run_id == run_id


def test_a_relative_uri_is_the_file_under_the_working_folder(store, monkeypatch):
    monkeypatch.chdir(store["folder"])
    run_id = new_run(store)
    assert SqliteStore.open("sqlite:///mlflow.db").record(run_id).params == {"width": "3"}


def test_the_command_reads_without_mlflow_where_it_can_and_with_its_client_otherwise(
    store, tmp_path
):
    from mlflow_tg.serve.rest import Server
    from mlflow_tg.serve.stores import MlflowStore, open_store

    assert isinstance(open_store(store["uri"], None, verbose=False), SqliteStore)
    assert isinstance(open_store(store["uri"], "http://e", verbose=False), SqliteStore)
    assert isinstance(open_store("http://127.0.0.1:1", "http://e", verbose=False), Server)
    mlflow_client = [  # verbose asks for MLflow's logs and checks; the others need MLflow
        (store["uri"], None, True),
        ("http://127.0.0.1:1", None, False),  # the version's artifacts come through the server
        (f"sqlite:///{tmp_path / 'new.db'}", None, False),  # MLflow makes the store
    ]
    for uri, endpoint, verbose in mlflow_client:
        assert isinstance(open_store(uri, endpoint, verbose), MlflowStore)
