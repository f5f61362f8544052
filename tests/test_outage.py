"""A tracking server that goes away mid-run, for longer than MLflow's HTTP retries, and comes
back: training goes on, and every metric of every epoch reaches the server; ``mlflow-tg replay``
delivers what a run could not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient
from mlflow.entities import RunStatus

from mlflow_tg import keys
from mlflow_tg.predictor.describe import note_line, with_note
from mlflow_tg.tracking.run import RunLogger
from mlflow_tg.tracking.spool import JOURNAL, Spool, read_journal, replay
from tests.conftest import CONF_DIR
from tests.servers import crash, free_port, mlflow_server_command, running_server

ROOT = CONF_DIR.parent
EPOCHS = 40
# MLflow's own retries kept short: each failed call gives up after a few seconds, so the
# outage below outlasts them many times over.
FAST_FAILING = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


def test_a_spool_left_undelivered_is_replayed_once(client: MlflowClient, tmp_path: Path):
    experiment = client.create_experiment("tests")
    run_id = client.create_run(experiment).info.run_id
    spool = Spool(tmp_path / "spool", run_id, client.tracking_uri)  # its courier never starts
    for epoch in range(3):
        spool.append("metrics", step=epoch, values={"val_acc": epoch / 10, "val_loss": 1.0})
    spool.append("tag", key="diverged", value="false")
    table = tmp_path / "history.parquet"
    pl.DataFrame({"epoch": [0, 1, 2]}).write_parquet(table)
    spool.add_file(table, None)
    assert spool.close(RunStatus.FINISHED, timeout_s=0) is False  # nothing could be delivered
    assert client.get_run(run_id).info.status == "RUNNING"
    _, records, delivered = read_journal(tmp_path / "spool")
    assert delivered == 0 and records[-1]["op"] == "end"
    assert replay(tmp_path / "spool") == (run_id, 6)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["diverged"] == "false"
    steps = [m.step for m in client.get_metric_history(run_id, "val_acc")]
    assert sorted(steps) == [0, 1, 2]
    assert [a.path for a in client.list_artifacts(run_id)] == [keys.HISTORY]
    assert replay(tmp_path / "spool") == (run_id, 0)  # delivered once: nothing twice


def test_a_courier_that_delivers_the_rest_while_it_is_stopped_has_delivered_everything(
    client: MlflowClient, tmp_path: Path
):
    run_id = client.create_run(client.create_experiment("tests")).info.run_id
    spool = Spool(tmp_path / "spool", run_id, client.tracking_uri).start()
    for epoch in range(50):
        spool.append("metrics", step=epoch, values={"val_acc": epoch / 100})
    assert spool.close(RunStatus.FINISHED, timeout_s=0) is True  # no wait, then the join's 5 s
    assert len(client.get_metric_history(run_id, "val_acc")) == 50


def test_a_spool_folder_reused_by_a_new_run_keeps_the_earlier_journal_apart(
    client: MlflowClient, tmp_path: Path
):
    experiment = client.create_experiment("tests")
    first, second = (client.create_run(experiment).info.run_id for _ in "ab")
    folder = tmp_path / "spool"  # a fixed hydra.run.dir: both runs' spool is here
    earlier = Spool(folder, first, client.tracking_uri)
    earlier.append("metrics", step=0, values={"val_acc": 0.1})
    assert earlier.close(RunStatus.FINISHED, timeout_s=0) is False  # left for replay
    later = Spool(folder, second, client.tracking_uri)
    later.append("metrics", step=0, values={"val_acc": 0.9})
    assert later.close(RunStatus.FINISHED, timeout_s=0) is False
    assert read_journal(folder)[0]["run_id"] == second
    assert replay(tmp_path / f"spool.{first}") == (first, 2)  # its own run, whole
    assert replay(folder) == (second, 2)
    assert [m.value for m in client.get_metric_history(first, "val_acc")] == [0.1]
    assert [m.value for m in client.get_metric_history(second, "val_acc")] == [0.9]
    third = client.create_run(experiment).info.run_id
    Spool(folder, third, client.tracking_uri).close(RunStatus.FINISHED, timeout_s=0)
    assert not (tmp_path / f"spool.{second}").exists()  # delivered: removed, not kept
    assert read_journal(folder)[0]["run_id"] == third


def predicted_by_hand(client: MlflowClient, run_id: str, value: float) -> str:
    """What `mlflow-tg predict` writes in a run's description (its note); returns the line."""
    answer = {keys.ANSWER: value, keys.ANSWER_LOW: 0.5, keys.ANSWER_HIGH: 0.9, keys.ANSWER_K: 2,
              keys.ANSWER_OOD: False}  # fmt: skip
    note = client.get_run(run_id).data.tags.get(keys.NOTE)
    client.set_tag(run_id, keys.NOTE, with_note(note, answer))
    return note_line(answer)


@pytest.fixture
def logging_to_client(client: MlflowClient):
    """MLflow's global tracking URI (where a RunLogger writes) set to the client's store."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    yield
    mlflow.set_tracking_uri(previous)


@pytest.mark.parametrize("spooled", [True, False])
def test_a_prediction_written_into_a_running_runs_description_is_kept(
    client: MlflowClient, tmp_path: Path, spooled: bool, logging_to_client
):
    run_id = client.create_run(client.create_experiment("tests")).info.run_id
    logger = RunLogger(run_id)
    if spooled:  # delivered by replay: its courier never starts
        logger.spool = Spool(tmp_path / "spool", run_id, client.tracking_uri)
    logger.describe("resnet, width 8")
    if spooled:
        logger.spool.close(RunStatus.RUNNING, timeout_s=0)
        replay(tmp_path / "spool")
        logger.spool = Spool(tmp_path / "spool", run_id, client.tracking_uri)
    theirs = predicted_by_hand(client, run_id, 0.7)
    logger.describe("completed 10 epochs")
    if spooled:
        logger.spool.close(RunStatus.FINISHED, timeout_s=0)
        replay(tmp_path / "spool")
    lines = ["resnet, width 8", "completed 10 epochs", theirs]
    assert client.get_run(run_id).data.tags[keys.NOTE] == keys.NOTE_BREAK.join(lines)
    ours = note_line({keys.ANSWER: 0.8, keys.ANSWER_LOW: 0.6, keys.ANSWER_HIGH: 1.0,
                      keys.ANSWER_K: 9, keys.ANSWER_OOD: False})  # fmt: skip
    if spooled:
        logger.spool = Spool(tmp_path / "spool", run_id, client.tracking_uri)
    logger.describe(ours)  # the run's own live prediction, written at its end: the latest
    if spooled:
        logger.spool.close(RunStatus.FINISHED, timeout_s=0)
        replay(tmp_path / "spool")
    lines[-1] = ours
    assert client.get_run(run_id).data.tags[keys.NOTE] == keys.NOTE_BREAK.join(lines)


def test_replay_goes_past_an_artifact_removed_once_delivered(client: MlflowClient, tmp_path):
    run_id = client.create_run(client.create_experiment("tests")).info.run_id
    spool = Spool(tmp_path / "spool", run_id, client.tracking_uri)
    table = tmp_path / "history.parquet"
    pl.DataFrame({"epoch": [0]}).write_parquet(table)
    spool.add_file(table, None)
    spool.append("metrics", step=0, values={"val_acc": 0.5})
    spool.close(RunStatus.FINISHED, timeout_s=0)
    _, records, _ = read_journal(tmp_path / "spool")
    (tmp_path / "spool" / records[0]["file"]).unlink()  # the process died after sending it
    assert replay(tmp_path / "spool") == (run_id, 3)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["val_acc"] == 0.5


def test_replay_names_a_folder_that_is_no_spool(tmp_path: Path, capsys):
    from mlflow_tg.serve.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["replay", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and str(tmp_path) in err and JOURNAL in err
    assert "Traceback" not in err


def test_replay_names_a_server_that_is_down_and_a_write_the_store_refuses(
    client: MlflowClient, tmp_path: Path, capsys
):
    from mlflow_tg.serve.cli import main

    run_id = client.create_run(client.create_experiment("tests")).info.run_id
    spool = Spool(tmp_path / "spool", run_id, client.tracking_uri)
    spool.append("metrics", step=0, values={"val_acc": 0.5})
    spool.close(RunStatus.FINISHED, timeout_s=0)
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as exit_:
        main(["replay", str(tmp_path / "spool"), "--tracking-uri", down])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"no MLflow tracking server answers at {down}" in err
    with pytest.raises(SystemExit) as exit_:  # a mistyped store: MLflow would create it
        main(["replay", str(tmp_path / "spool"), "--tracking-uri", f"sqlite:///{tmp_path}/x.db"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"({tmp_path}/x.db does not exist)" in err
    assert not (tmp_path / "x.db").exists()
    client.delete_run(run_id)  # the store now refuses every write to it
    with pytest.raises(SystemExit) as exit_:
        main(["replay", str(tmp_path / "spool")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"refused record 1 (metrics) of run {run_id}" in err
    assert "0 of the journal's 2 records are delivered" in err and "Traceback" not in err


def journal_of(folder: Path) -> list[dict]:
    found = list((folder / "outputs").glob(f"*/*/spool/{JOURNAL}"))
    if not found:
        return []
    return [json.loads(line) for line in found[0].read_text().splitlines()[1:] if line]


def wait_for(condition, what: str, process: subprocess.Popen, log: Path, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: timed out; {log.read_text()[-3000:]}"
        assert process.poll() is None, f"{what}: training exited; {log.read_text()[-3000:]}"
        time.sleep(0.5)


def some_epochs_on(client: MlflowClient) -> bool:
    """Whether the server has the run, with its first epochs."""
    found = client.get_experiment_by_name("mlflow_tg")
    runs = [] if found is None else client.search_runs([found.experiment_id])
    return bool(runs) and "val_acc" in runs[0].data.metrics


def server_metrics(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def outage_after_first_epochs(tmp_path: Path, drain_s: float):
    """A real tracking server, a training run against it, and the server crashed once the run
    has its first epochs there: the server's command, URL, the training process and its log."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = mlflow_server_command(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "art", port)
    log = tmp_path / "train.log"
    with running_server(command, f"{url}/health", tmp_path / "server1.log") as server:
        with open(log, "w") as output:
            training = subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), "model=mlp", "width=2", "graph=off",
                 "device=cpu", "num_threads=1", f"epochs={EPOCHS}", "tracking=server",
                 f"tracking.uri={url}", f"tracking.drain_timeout_s={drain_s}"],
                cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT,
                env=os.environ | FAST_FAILING,
            )  # fmt: skip
        wait_for(partial(some_epochs_on, MlflowClient(url)), "first epochs", training, log)
        crash(server)
    return command, url, training, log


@pytest.mark.slow
def test_a_server_outage_mid_run_loses_nothing_and_the_run_finishes(tmp_path: Path):
    command, url, training, log = outage_after_first_epochs(tmp_path, drain_s=300)
    # Down for good: training goes on to its test evaluation, its writes journaled.
    wait_for(
        lambda: any(keys.TEST_ACC in r.get("values", {}) for r in journal_of(tmp_path)),
        "training to the end while the server is down", training, log,
    )  # fmt: skip
    time.sleep(15)  # the outage outlasts MLflow's retries several times over
    assert training.poll() is None  # waiting for the server, not failed
    with running_server(command, f"{url}/health", tmp_path / "server2.log"):
        assert training.wait(timeout=300) == 0, log.read_text()[-3000:]
        client = MlflowClient(url)
        (run,) = client.search_runs([client.get_experiment_by_name("mlflow_tg").experiment_id])
        assert run.info.status == "FINISHED"
        run_id = run.info.run_id
        for key in (keys.VAL_ACC, keys.VAL_LOSS):
            assert server_metrics(client, run_id, key) == list(range(EPOCHS + 1))
        for key in (keys.TRAIN_LOSS, keys.TRAIN_ACC, keys.EPOCH_TIME, keys.LEARNING_RATE):
            assert server_metrics(client, run_id, key) == list(range(1, EPOCHS + 1))
        assert server_metrics(client, run_id, keys.TEST_ACC) == [EPOCHS]
        history = Path(client.download_artifacts(run_id, keys.HISTORY, str(tmp_path)))
        assert pl.read_parquet(history)["epoch"].to_list() == list(range(EPOCHS + 1))
        assert "completed" in run.data.tags[keys.NOTE]
    output = log.read_text()
    assert "does not answer" in output and "answers again" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_a_run_whose_server_is_still_away_at_its_end_exits_75_naming_its_replay(tmp_path):
    command, url, training, log = outage_after_first_epochs(tmp_path, drain_s=5)
    assert training.wait(timeout=300) == 75, log.read_text()[-3000:]  # EX_TEMPFAIL
    last = log.read_text().strip().splitlines()[-1]
    (folder,) = (tmp_path / "outputs").glob("*/*/spool")
    assert f"mlflow-tg replay {folder}" in last, last
    with running_server(command, f"{url}/health", tmp_path / "server2.log"):
        run_id, _ = replay(folder)
        assert MlflowClient(url).get_run(run_id).info.status == "FINISHED"
        assert server_metrics(MlflowClient(url), run_id, keys.TEST_ACC) == [EPOCHS]


@pytest.mark.slow
def test_a_sigterm_while_the_end_waits_for_the_server_journals_the_end_at_once(tmp_path: Path):
    """A scheduler's time limit during the drain: the run's end reaches the journal within
    seconds (a SIGKILL follows), and ``mlflow-tg replay`` ends the run with everything."""
    command, url, training, log = outage_after_first_epochs(tmp_path, drain_s=600)
    wait_for(
        lambda: any(keys.TEST_ACC in r.get("values", {}) for r in journal_of(tmp_path)),
        "training to its end while the server is down", training, log,
    )  # fmt: skip
    time.sleep(3)  # in the drain, which would wait 600 s
    training.terminate()
    try:  # as `docker stop` does: SIGKILL 10 s after SIGTERM
        code = training.wait(timeout=10)
    except subprocess.TimeoutExpired:
        training.kill()
        code = training.wait(timeout=60)
    assert code != 0, log.read_text()[-3000:]
    records = journal_of(tmp_path)
    assert records[-1]["op"] == "end" and records[-1]["status"] == "FINISHED"  # training was done
    if code == 143:  # it exited by itself within the 10 s: its last words say what to do
        last = log.read_text().strip().splitlines()[-1]
        assert "after the run's last epoch" in last and "mlflow-tg replay" in last, last
    (folder,) = (tmp_path / "outputs").glob("*/*/spool")
    with running_server(command, f"{url}/health", tmp_path / "server2.log"):
        run_id, _ = replay(folder)
        run = MlflowClient(url).get_run(run_id)
        assert run.info.status == "FINISHED"
        assert server_metrics(MlflowClient(url), run_id, keys.VAL_ACC) == list(range(EPOCHS + 1))
        assert server_metrics(MlflowClient(url), run_id, keys.TEST_ACC) == [EPOCHS]
