"""Runs whose process died by SIGKILL: the heartbeat, and ``mlflow-tg reap`` ending them KILLED."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlflow_tg import keys
from mlflow_tg.serve.cli import main
from mlflow_tg.tracking.reap import ReapError, heartbeat_time, parse_duration, reap
from mlflow_tg.tracking.run import sqlite_lock
from mlflow_tg.tracking.spool import now_iso
from tests.conftest import CONF_DIR
from tests.servers import free_port

ROOT = CONF_DIR.parent
TINY = ["model=mlp", "width=2", "graph=off", "device=cpu", "num_threads=1"]


def reap_cli(uri: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlflow_tg.serve.cli", "reap", "--tracking-uri", uri, *arguments],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def reap_in_process(capsys, *arguments: str) -> tuple[int, str, str]:
    """``mlflow-tg reap …`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main(["reap", *arguments])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_durations_are_read_with_their_units_and_bad_ones_are_named():
    assert parse_duration("90") == 90 and parse_duration("90s") == 90
    assert parse_duration("10m") == 600 and parse_duration("2h") == 7200
    assert parse_duration("1.5d") == 1.5 * 86400
    for bad in ("", "0", "-5m", "ten minutes", "5w"):
        with pytest.raises(ReapError) as error:
            parse_duration(bad)
        assert repr(bad) in str(error.value) and "10m" in str(error.value)


def test_heartbeat_tags_round_trip():
    beat = now_iso()
    assert abs(heartbeat_time(beat) - time.time()) < 2
    assert heartbeat_time(None) is None and heartbeat_time("yesterday") is None


def test_reap_ends_only_stale_runs_with_a_heartbeat(client: MlflowClient):
    experiment = client.create_experiment("tests")
    stale_beat = "2020-01-01T00:00:00Z"
    stale = client.create_run(experiment, tags={keys.HEARTBEAT: stale_beat}).info.run_id
    live = client.create_run(experiment, tags={keys.HEARTBEAT: now_iso()}).info.run_id
    silent = client.create_run(experiment).info.run_id  # not a train.py run: left alone
    done = client.create_run(experiment, tags={keys.HEARTBEAT: stale_beat}).info.run_id
    client.set_terminated(done, "FINISHED")
    found, without = reap(client, 600, dry_run=True)
    assert [v.run_id for v in found] == [stale] and [v.run_id for v in without] == [silent]
    assert client.get_run(stale).info.status == "RUNNING"  # a dry run changes nothing
    reap(client, 600, experiment="tests")
    assert client.get_run(stale).info.status == "KILLED"
    assert client.get_run(stale).info.end_time == int(heartbeat_time(stale_beat) * 1000)
    assert "no heartbeat for" in client.get_run(stale).data.tags[keys.REAPED]
    for run_id, status in ((live, "RUNNING"), (silent, "RUNNING"), (done, "FINISHED")):
        assert client.get_run(run_id).info.status == status


def test_reap_names_an_unknown_experiment_and_a_bad_duration(tracking_uri: str, capsys):
    code, _, err = reap_in_process(capsys, "--tracking-uri", tracking_uri, "--older-than", "10m",
                                   "--experiment", "nope")  # fmt: skip
    assert code == 2 and "'nope'" in err and "Traceback" not in err
    code, _, err = reap_in_process(capsys, "--tracking-uri", tracking_uri, "--older-than", "soon")
    assert code == 2 and "'soon'" in err and err.count("\n") == 1
    code, out, _ = reap_in_process(capsys, "--tracking-uri", tracking_uri, "--older-than", "10m")
    assert code == 0 and "0 stale runs ended KILLED" in out


def test_reap_refuses_a_store_that_is_not_there_and_makes_none(tmp_path: Path, capsys):
    missing = tmp_path / "elsewhere" / "mlflow.db"  # a server sweep's folder, say
    code, _, err = reap_in_process(capsys, "--tracking-uri", f"sqlite:///{missing}",
                                   "--older-than", "10m")  # fmt: skip
    assert code == 2 and f"({missing} does not exist)" in err and "--tracking-uri" in err
    assert not missing.parent.exists()


def test_reap_names_a_database_that_gives_no_connection_without_its_password(capsys):
    pytest.importorskip("psycopg2")
    uri = f"postgresql+psycopg2://mlflow_tg:secret@127.0.0.1:{free_port()}/mlflow_tg"
    code, _, err = reap_in_process(capsys, "--tracking-uri", uri, "--older-than", "10m")
    assert code == 2 and err.count("\n") == 1, err
    assert "no connection to the database at postgresql+psycopg2://mlflow_tg:***@" in err
    assert "(OperationalError: connection" in err and "secret" not in err


def start_training(folder: Path, uri: str, name: str) -> subprocess.Popen:
    log = open(folder / f"{name}.log", "w")  # noqa: SIM115  a pipe nobody reads would block it
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *TINY, "epochs=100000", f"seed={len(name)}",
         f"tracking.uri={uri}", "tracking.heartbeat_s=1"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def wait_until_running(uri: str, processes: list[subprocess.Popen], folder: Path) -> list:
    """The runs of ``processes``, once each is RUNNING and has logged an epoch."""
    deadline = time.monotonic() + 300
    while True:
        assert all(p.poll() is None for p in processes), (folder / "a.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the runs never started"
        if (folder / "mlflow.db").exists():
            with sqlite_lock(uri):  # not while a job creates the store
                client = MlflowClient(uri)
                found = client.get_experiment_by_name("mlflow_tg")
                runs = [] if found is None else client.search_runs([found.experiment_id])
            if len(runs) == len(processes) and all(
                r.info.status == "RUNNING" and "val_acc" in r.data.metrics for r in runs
            ):
                return runs
        time.sleep(0.5)


@pytest.mark.slow
def test_a_run_killed_by_sigkill_is_reaped_and_a_live_one_is_not(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the store exists before two jobs open it
    killed, live = start_training(tmp_path, uri, "a"), start_training(tmp_path, uri, "bb")
    try:
        runs = wait_until_running(uri, [killed, live], tmp_path)
        by_seed = {r.data.params["seed"]: r.info.run_id for r in runs}
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        time.sleep(12)  # the dead run's heartbeat grows stale; the live one beats every second
        result = reap_cli(uri, "--older-than", "8s")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "1 stale run ended KILLED" in result.stdout, result.stdout
        client = MlflowClient(uri)
        dead = client.get_run(by_seed["1"])
        assert dead.info.status == "KILLED" and keys.REAPED in dead.data.tags
        assert client.get_run(by_seed["2"]).info.status == "RUNNING"
        assert live.poll() is None
    finally:
        for process in (killed, live):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(120)
    assert MlflowClient(uri).get_run(by_seed["2"]).info.status == "KILLED"  # by its SIGTERM


@pytest.mark.parametrize("override", ["tracking.heartbeat_s=0", "tracking.drain_timeout_s=-1",
                                      "tracking.heartbeat_s=inf"])  # fmt: skip
def test_heartbeat_and_drain_times_must_be_positive(override: str):
    from mlflow_tg.config import check_config, compose_config
    from mlflow_tg.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        check_config(compose_config([override]))
    assert override.split("=")[0] in str(error.value) and "above 0" in str(error.value)
