"""Failures caused for real: concurrent starts, SIGTERM, a sweep with a bad job, a server down,
a damaged history artifact, unchecked data files.

Concurrent starts go through ``tests/start_together.py``: each process imports everything
first, then waits for one file, so that the real ``train.py`` jobs reach MLflow and Hydra's
output folder at the same instant, as they do on a machine with cores to spare.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from mlflow_tg import keys
from mlflow_tg.errors import InputError
from mlflow_tg.predictor.dataset import build_dataset
from mlflow_tg.tracking import sweep
from mlflow_tg.tracking.run import check_tracking_server, sqlite_lock
from mlflow_tg.tracking.runs import CorruptHistoryError, load_run, load_runs, read_history
from mlflow_tg.tracking.spool import Spool, read_journal, replay
from tests.conftest import CONF_DIR
from tests.servers import free_port

ROOT = CONF_DIR.parent
TRAIN = str(ROOT / "train.py")
TINY = ["model=mlp", "width=2", "graph=off", "device=cpu", "num_threads=1"]


def start_together(folder: Path, commands: list[list[str]]) -> list[subprocess.Popen]:
    """Start ``train.py`` processes that wait, imports done, until released together."""
    go = folder / "go"
    helper = str(ROOT / "tests" / "start_together.py")
    processes = [
        subprocess.Popen(
            [sys.executable, helper, str(go), TRAIN, *command],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for command in commands
    ]
    ready = [folder / f"ready.{p.pid}" for p in processes]
    deadline = time.monotonic() + 300
    while not all(path.exists() for path in ready):
        assert time.monotonic() < deadline, "the processes did not get ready"
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        time.sleep(0.1)
    time.sleep(1 - time.time() % 1 + 0.05)  # just after a second starts: one folder name
    go.touch()
    return processes


def finish(processes: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    """Exit code and output of each process."""
    return [(p.wait(timeout), p.communicate()[0]) for p in processes]


def runs_of(uri: str, experiment: str = "mlflow_tg") -> tuple[MlflowClient, list]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client, [] if found is None else client.search_runs([found.experiment_id])


# --- B1: concurrent first use of a SQLite store ---------------------------------------------


@pytest.mark.slow
def test_eight_runs_started_at_once_on_a_missing_sqlite_store_all_finish(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    commands = [
        [*TINY, "epochs=1", f"seed={seed}", f"tracking.uri={uri}",
         f"tracking.artifact_root={tmp_path / 'artifacts'}"]
        for seed in range(8)
    ]  # fmt: skip
    results = finish(start_together(tmp_path, commands))
    failed = [output[-2000:] for code, output in results if code != 0]
    assert not failed, f"{len(failed)} of 8 failed; first: {failed[0]}"
    _, runs = runs_of(uri)
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(int(r.data.params["seed"]) for r in runs) == list(range(8))


# --- B2: runs started in the same second -----------------------------------------------------


@pytest.mark.slow
def test_runs_started_in_the_same_second_each_log_their_own_hydra_config(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("mlflow_tg")  # the store exists: only Hydra is tested
    commands = [[*TINY, "epochs=1", f"seed={seed}", f"tracking.uri={uri}"] for seed in range(4)]
    results = finish(start_together(tmp_path, commands))
    assert all(code == 0 for code, _ in results), [out[-2000:] for _, out in results]
    client, runs = runs_of(uri)
    assert len(runs) == 4
    for run in runs:
        logged = client.download_artifacts(run.info.run_id, ".hydra/config.yaml", str(tmp_path))
        assert yaml.safe_load(Path(logged).read_text())["seed"] == int(run.data.params["seed"])
    folders = list((tmp_path / "outputs").glob("*/*"))
    assert len(folders) == 4, folders  # one output folder per job


# --- B3: SIGTERM -------------------------------------------------------------------------------


def training_without_end(folder: Path, uri: str) -> subprocess.Popen:
    """A tiny ``train.py`` job of endless epochs in ``folder``, its output piped."""
    return subprocess.Popen(
        [sys.executable, TRAIN, *TINY, "epochs=100000", f"tracking.uri={uri}"],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_for_training(process: subprocess.Popen, uri: str, runs: int) -> None:
    """Until ``runs`` runs of ``process`` are RUNNING with an epoch logged."""
    path = Path(uri.removeprefix("sqlite:///"))
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the runs never started"
        if path.exists():
            with sqlite_lock(uri):  # not while the job creates the store
                _, found = runs_of(uri)
            training = [
                r for r in found if r.info.status == "RUNNING" and "val_acc" in r.data.metrics
            ]
            if len(training) == runs:
                return
        time.sleep(0.5)


def signal_once_training(
    process: subprocess.Popen, uri: str, runs: int, signum: int = signal.SIGTERM
) -> str:
    """``signum`` to ``process`` once ``runs`` runs are RUNNING with an epoch logged; its output."""
    try:
        wait_for_training(process, uri, runs)
        process.send_signal(signum)  # to this process only, not its children
        return process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_the_process_with_143(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = training_without_end(tmp_path, uri)
    output = signal_once_training(process, uri, runs=1)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    (run,) = runs_of(uri)[1]
    assert run.info.status == "KILLED"
    assert run.data.tags[keys.KILLED_BY] == "SIGTERM"
    assert "Traceback" not in output


@pytest.mark.slow
def test_sigterm_before_the_run_starts_stops_the_job_at_once(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = training_without_end(tmp_path, uri)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "outputs").exists():  # Hydra made the job's folder: set-up begins
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output
    if (tmp_path / "mlflow.db").exists():  # the signal came as the run was being created
        assert all(r.info.status == "KILLED" for r in runs_of(uri)[1])


@pytest.mark.slow
def test_ctrl_c_ends_the_run_killed_and_the_process_with_130_in_one_line(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = training_without_end(tmp_path, uri)
    output = signal_once_training(process, uri, runs=1, signum=signal.SIGINT)
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "interrupted (Ctrl-C)" in output.splitlines()[-1]
    (run,) = runs_of(uri)[1]
    assert run.info.status == "KILLED" and run.data.tags[keys.KILLED_BY] == "SIGINT"


def cmdline(pid: int) -> str:
    """The command line of process ``pid`` ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def processes_of_sweep(launcher: int) -> list[int]:
    """Processes started for the sweep of ``launcher``: they carry its pid in their environment."""
    mark = f"{sweep.SWEEP_PID}={launcher}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "seeds"),
    [(2, "1,2,3,4"), (3, "1,2")],  # two jobs queued; a worker that never runs a job
)
def test_sigterm_to_a_joblib_sweep_ends_its_running_runs_killed_and_starts_no_more(
    tmp_path, workers, seeds
):
    """The signal reaches the launching process only (``kill PID``), not its worker processes."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = subprocess.Popen(
        [sys.executable, TRAIN, "-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}",
         *TINY, "epochs=100000", f"seed={seeds}", f"tracking.uri={uri}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    output = signal_once_training(process, uri, runs=2)  # both workers' runs
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "no job started after it" in output and "Traceback" not in output
    _, runs = runs_of(uri)
    assert len(runs) == 2  # the two jobs left in the queue never started
    assert all(r.info.status == "KILLED" for r in runs), [r.info.status for r in runs]
    assert all(r.data.tags[keys.KILLED_BY] == "SIGTERM" for r in runs)
    time.sleep(2)
    assert processes_of_sweep(process.pid) == []  # no worker left training, orphaned


# --- B4: a joblib worker that dies mid-run ---------------------------------------------------

A_WORKER_DIES = """
import os, signal, sys
from pathlib import Path
from mlflow import MlflowClient
from mlflow_tg.tracking import sweep
from mlflow_tg.tracking.spool import Spool

uri, folder, tag = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
client = MlflowClient(uri)
run_id = client.create_run(client.create_experiment("tests")).info.run_id
sweep.enrol(run_id, folder, uri)
spool = Spool(folder, run_id, uri)  # its courier never starts: nothing reaches the store
for epoch in range(3):
    spool.append("metrics", step=epoch, values={"val_acc": epoch / 10})
if tag:
    spool.append("tag", key=tag, value="x")
(folder / "delivered").write_text("")  # cut by the SIGKILL too
print(run_id, flush=True)
spool.journal.write('{"op":"metrics","seq":4,"ti')  # a last line cut by the SIGKILL
spool.journal.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def sweep_folders() -> set[Path]:
    """The sweep folders in the temporary folder."""
    return set(Path(tempfile.gettempdir()).glob("mlflow_tg.sweep-*"))


@pytest.fixture
def as_launcher(monkeypatch) -> Path:
    """This process as a sweep's launching process; its folder is removed afterwards."""
    where = Path(tempfile.mkdtemp(prefix="mlflow_tg.sweep-test."))
    monkeypatch.setenv(sweep.SWEEP_PID, str(os.getpid()))
    monkeypatch.setenv(sweep.SWEEP_DIR, str(where))
    yield where
    shutil.rmtree(where, ignore_errors=True)


def worker_that_dies(uri: str, folder: Path, tag: str = "") -> tuple[str, int]:
    """A worker of this process's sweep that journals 3 epochs of a run and dies: (run, pid)."""
    child = subprocess.Popen(
        [sys.executable, "-c", A_WORKER_DIES, uri, str(folder), tag],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err[-3000:]
    return out.strip(), child.pid


def test_a_dead_workers_run_gets_its_journaled_epochs_and_ends_killed(
    client: MlflowClient, tmp_path: Path, as_launcher: Path
):
    run_id, pid = worker_that_dies(client.tracking_uri, tmp_path / "spool")
    assert client.get_run(run_id).info.status == "RUNNING"
    assert sweep.finish() == [f"run {run_id}: 3 journaled writes delivered, ended KILLED"]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and f"pid {pid}) died" in run.data.tags[keys.REAPED]
    assert [m.value for m in client.get_metric_history(run_id, "val_acc")] == [0.0, 0.1, 0.2]
    assert not as_launcher.exists()  # the sweep's folder goes with it


def test_a_dead_workers_run_whose_store_is_away_journals_its_end_for_replay(
    client: MlflowClient, tmp_path: Path, as_launcher: Path
):
    run_id, _ = worker_that_dies(client.tracking_uri, tmp_path / "spool")
    store = Path(client.tracking_uri.removeprefix("sqlite:///"))
    store.rename(store.with_suffix(".away"))  # the store is gone while the sweep ends
    (line,) = sweep.end_lost_runs()
    assert "its writes and its end (KILLED) wait" in line
    assert line.endswith(f"mlflow-tg replay {tmp_path / 'spool'}")
    store.with_suffix(".away").rename(store)
    assert replay(tmp_path / "spool") == (run_id, 5)  # 3 epochs, why, the end; the cut line not
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "died while it ran" in run.data.tags[keys.REAPED]
    assert len(client.get_metric_history(run_id, "val_acc")) == 3


def test_a_dead_workers_run_ends_killed_even_when_the_store_refuses_its_journal(
    client: MlflowClient, tmp_path: Path, as_launcher: Path
):
    run_id, _ = worker_that_dies(client.tracking_uri, tmp_path / "spool", tag="bad key/../x")
    (line,) = sweep.end_lost_runs()
    assert "ended KILLED; the store refused part of its journal" in line
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "refused" in run.data.tags[keys.REAPED]


def test_a_run_enrolled_by_a_worker_that_lives_is_left_alone_and_a_reused_pid_is_not_it(
    client: MlflowClient, tmp_path: Path, as_launcher: Path
):
    (as_launcher / "runs").mkdir()
    run_id = client.create_run(client.create_experiment("tests")).info.run_id
    me, started = os.getpid(), sweep.started_at(os.getpid())
    entry = {"spool": str(tmp_path / "none"), "uri": client.tracking_uri, "pid": me}
    (as_launcher / "runs" / run_id).write_text(json.dumps({**entry, "started": started}))
    assert sweep.end_lost_runs(wait_s=0.2) == [f"run {run_id}: its worker (pid {me}) still runs"]
    # the same pid, started at another time: the worker died, and its pid went to another one
    (as_launcher / "runs" / run_id).write_text(json.dumps({**entry, "started": started - 1}))
    assert sweep.end_lost_runs() == [f"run {run_id}: ended KILLED"]  # enrolled before its spool
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_spool_folder_holding_another_runs_journal_is_not_replayed_into_a_lost_run(
    client: MlflowClient, tmp_path: Path, as_launcher: Path
):
    experiment = client.create_experiment("tests")
    lost, earlier = (client.create_run(experiment).info.run_id for _ in "ab")
    spool = Spool(tmp_path / "spool", earlier, client.tracking_uri)  # a fixed hydra.run.dir
    spool.append("metrics", step=0, values={"val_acc": 0.5})
    (as_launcher / "runs").mkdir()
    entry = {"spool": str(tmp_path / "spool"), "uri": client.tracking_uri, "pid": os.getpid(),
             "started": -1}  # fmt: skip
    (as_launcher / "runs" / lost).write_text(json.dumps(entry))
    assert sweep.end_lost_runs() == [f"run {lost}: ended KILLED"]
    assert client.get_metric_history(lost, "val_acc") == []
    assert client.get_run(earlier).info.status == "RUNNING"  # its journal, left for its replay


def a_dead_process() -> tuple[int, int]:
    """The pid and start time of a real process, now gone (as if SIGKILLed)."""
    child = subprocess.Popen(["sleep", "60"])
    started = sweep.started_at(child.pid)
    child.kill()
    child.wait()
    return child.pid, started


def a_sweep_folder(pid: int, started: int, host: str = "") -> Path:
    """A sweep folder naming ``pid`` as its launching process (on ``host``, else this one)."""
    where = Path(tempfile.mkdtemp(prefix=f"{sweep.FOLDER_PREFIX}{pid}."))
    launcher = {"pid": pid, "started": started, "host": host or socket.gethostname(),
                "boot": sweep.boot_id()}  # fmt: skip
    (where / sweep.LAUNCHER).write_text(json.dumps(launcher))
    return where


def test_a_killed_launchers_folder_is_cleared_by_the_next_sweep_once_its_workers_are_gone(
    client: MlflowClient, tmp_path: Path, monkeypatch
):
    dead = a_dead_process()
    empty, lost, living, elsewhere = (a_sweep_folder(*dead, host) for host in ("", "", "", "b"))
    monkeypatch.setenv(sweep.SWEEP_PID, str(os.getpid()))  # this process, its launcher
    monkeypatch.setenv(sweep.SWEEP_DIR, str(lost))
    run_id, _ = worker_that_dies(client.tracking_uri, tmp_path / "spool")  # enrolled in `lost`
    (living / "runs").mkdir()  # an orphaned worker (this process) still runs its job
    me = {"spool": str(tmp_path), "uri": client.tracking_uri, "pid": os.getpid(),
          "started": sweep.started_at(os.getpid())}  # fmt: skip
    (living / "runs" / "a-run").write_text(json.dumps(me))
    for name in (sweep.SWEEP_DIR, sweep.SWEEP_PID):  # as they were, after sweep.start sets them
        monkeypatch.setenv(name, "")
    try:
        sweep.start()
        assert not empty.exists()  # its launcher is gone, and nothing is left in it
        assert not lost.exists()  # its dead worker's run was ended first, as its launcher would
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and keys.REAPED in run.data.tags
        assert len(client.get_metric_history(run_id, "val_acc")) == 3
        assert living.exists()  # a worker of it finishes its run
        assert elsewhere.exists()  # another machine's: its processes cannot be seen here
        mine = sweep.folder()
        assert mine is not None and mine.name.startswith(f"{sweep.FOLDER_PREFIX}{os.getpid()}.")
        sweep.remove_stale_folders()
        assert mine.exists()  # a live launching process's folder stays
    finally:
        for where in (empty, lost, living, elsewhere, sweep.folder()):
            if where is not None:
                shutil.rmtree(where, ignore_errors=True)


def test_a_sweep_folder_of_earlier_code_is_cleared_once_its_pid_is_gone():
    dead, _ = a_dead_process()
    old = time.time() - 2 * sweep.MAKING_S
    folders = {}
    for name, pid, made in [("gone", dead, old), ("alive", os.getpid(), old), ("new", dead, None)]:
        where = Path(tempfile.mkdtemp(prefix=f"{sweep.FOLDER_PREFIX}{pid}."))  # no launcher file
        if made is not None:
            os.utime(where, (made, made))
        folders[name] = where
    try:
        sweep.remove_stale_folders()
        assert not folders["gone"].exists()
        assert folders["alive"].exists()  # a process has its pid: taken for its launcher
        assert folders["new"].exists()  # without the file for under a minute: being made
    finally:
        for where in folders.values():
            shutil.rmtree(where, ignore_errors=True)


@pytest.mark.slow
def test_a_joblib_worker_killed_mid_run_leaves_no_run_running_and_loses_no_epoch(tmp_path):
    """SIGKILL to one worker, as the OOM killer sends it: joblib kills the other one too."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = subprocess.Popen(
        [sys.executable, TRAIN, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         *TINY, "epochs=100000", "seed=1,2,3", f"tracking.uri={uri}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for_training(process, uri, runs=2)
        (victim, *_) = [p for p in processes_of_sweep(process.pid) if "LokyProcess" in cmdline(p)]
        os.kill(victim, signal.SIGKILL)
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "{SIGKILL(-9)}" in output
    assert output.count("ended KILLED") >= 1  # the runs the launching process ended, listed
    client, runs = runs_of(uri)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}
    reaped = [r for r in runs if f"pid {victim}) died" in r.data.tags.get(keys.REAPED, "")]
    assert len(reaped) == 1, [r.data.tags for r in runs]
    for run in runs:  # every epoch journaled reached the store
        (journal,) = [
            path for path in tmp_path.glob("multirun/*/*/*/spool/journal.jsonl")
            if read_journal(path.parent)[0]["run_id"] == run.info.run_id
        ]  # fmt: skip
        records = read_journal(journal.parent)[1]
        epochs = [r["step"] for r in records if r["op"] == "metrics" and "val_acc" in r["values"]]
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == len(set(epochs))
    time.sleep(2)
    assert processes_of_sweep(process.pid) == []
    assert not [f for f in sweep_folders() if f.name.startswith(f"mlflow_tg.sweep-{process.pid}.")]


@pytest.mark.slow
def test_joblib_workers_whose_launching_process_is_killed_finish_their_runs_and_exit(tmp_path):
    """SIGKILL to the launching process: its workers, orphaned, must not wait for ever."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = (tmp_path / "output.log").open("w")  # not a pipe: no one would read it after the kill
    process = subprocess.Popen(
        [sys.executable, TRAIN, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         *TINY, "epochs=300", "seed=1,2,3", f"tracking.uri={uri}"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for_training(process, uri, runs=2)
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 300
        while processes_of_sweep(process.pid):
            assert time.monotonic() < deadline, "the orphaned workers did not exit"
            time.sleep(1)
    finally:
        for pid in processes_of_sweep(process.pid):
            os.kill(pid, signal.SIGKILL)
        log.close()
        for left in sweep_folders():  # the killed process could not remove its own
            if left.name.startswith(f"mlflow_tg.sweep-{process.pid}."):
                shutil.rmtree(left)
    assert (tmp_path / "output.log").read_text().count("this worker exits") == 2
    _, runs = runs_of(uri)
    assert len(runs) == 2  # the queued job did not start
    assert {r.info.status for r in runs} == {"FINISHED"}


# --- B5: a sweep with a job that has a bad value --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"]
)
def test_a_bad_job_of_a_multirun_is_refused_and_the_others_run(tmp_path: Path, launcher):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = sweep_folders()
    result = subprocess.run(
        [sys.executable, TRAIN, "-m", *launcher, *TINY, "epochs=1", f"tracking.uri={uri}",
         "optimizer.lr=0.01,-1,0.02"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    _, runs = runs_of(uri)
    assert sorted(r.data.params["optimizer.lr"] for r in runs) == ["0.01", "0.02"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert output.count("optimizer.lr=-1.0 is not allowed") >= 1
    assert "1 of the 3 jobs" in output and "Traceback" not in output
    assert sweep_folders() <= before  # the launching process removed its own


# --- B7: a tracking server that is down ------------------------------------------------------


def test_an_unreachable_tracking_server_is_named_at_once(tmp_path: Path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(InputError) as error:
        check_tracking_server(uri, timeout_s=2)
    assert time.monotonic() - started < 10
    assert uri in str(error.value) and "make server-start" in str(error.value)


@pytest.mark.slow
def test_training_against_a_closed_port_exits_2_without_a_traceback(tmp_path: Path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, TRAIN, *TINY, "epochs=1", "tracking=server", f"tracking.uri={uri}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert uri in output and "make server-start" in output and "Traceback" not in output
    assert time.monotonic() - started < 120  # not MLflow's four minutes of retries


def test_training_against_a_database_that_does_not_answer_exits_2_naming_it(tmp_path: Path):
    pytest.importorskip("psycopg2")
    uri = f"postgresql+psycopg2://mlflow_tg:secret@127.0.0.1:{free_port()}/mlflow_tg"
    result = subprocess.run(
        [sys.executable, TRAIN, *TINY, "epochs=1", f"tracking.uri={uri}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "no connection to the database (OperationalError: connection" in output, output
    assert "make server-start" in output and "Traceback" not in output
    assert "secret" not in output and uri.replace("secret", "***") in output


# --- B9: a damaged history.parquet -----------------------------------------------------------


def corrupt_history(client: MlflowClient, run_id: str, folder: Path) -> None:
    """Replace the run's history.parquet with a truncated copy of itself."""
    good = Path(client.download_artifacts(run_id, keys.HISTORY, str(folder / run_id)))
    damaged = folder / "damaged" / keys.HISTORY
    damaged.parent.mkdir(parents=True, exist_ok=True)
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    client.log_artifact(run_id, str(damaged))


def test_a_damaged_history_is_named_for_one_run_and_left_out_in_bulk(
    make_cfg, client, tmp_path, caplog
):
    from mlflow_tg.job import train

    good, bad = (
        train(make_cfg("model=mlp", "graph=off", "epochs=2", f"seed={seed}"))["run_id"]
        for seed in (0, 1)
    )
    corrupt_history(client, bad, tmp_path)
    assert len(read_history(client, good)) == 3
    with pytest.raises(CorruptHistoryError) as error:
        load_run(client, bad)
    message = str(error.value)
    assert bad in message and keys.HISTORY in message and "\n" not in message
    with caplog.at_level(logging.WARNING, logger="mlflow_tg.tracking.runs"):
        records = {r.run_id: r for r in load_runs(client, "tests")}
    assert records[good].history is not None and records[bad].history is None
    assert bad in caplog.text and "cannot be read" in caplog.text
    dataset = build_dataset(list(records.values()), 1, "curve")
    assert dataset.frame["run_id"].to_list() == [good]
    assert dataset.left_out == {f"unreadable {keys.HISTORY}": 1}


def test_mlflow_tg_predict_on_a_damaged_history_exits_2_naming_it(
    make_cfg, client, tracking_uri, tmp_path
):
    from mlflow_tg.job import train

    run_id = train(make_cfg("model=mlp", "graph=off", "epochs=2"))["run_id"]
    corrupt_history(client, run_id, tmp_path)
    # a registered version with the tags `predict` reads; its model is never loaded
    client.create_registered_model(keys.REGISTERED_MODEL)
    version = client.create_model_version(
        keys.REGISTERED_MODEL, str(tmp_path), tags={keys.K_TAG: "1", keys.SETS_TAG: "curve"}
    )
    client.set_registered_model_alias(keys.REGISTERED_MODEL, keys.CHAMPION, version.version)
    result = subprocess.run(
        [sys.executable, "-m", "mlflow_tg.serve.cli", "predict", "--run-id", run_id,
         "--tracking-uri", tracking_uri],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert run_id in result.stderr and keys.HISTORY in result.stderr
    assert "Traceback" not in result.stderr


# --- B10: data files read without their checksums --------------------------------------------


def test_checksums_off_warns_that_pickles_are_loaded_unchecked(tmp_path, caplog):
    from mlflow_tg.train.data import DataNotFoundError, load_data
    from tests.test_data import data_cfg, write_cifar10

    write_cifar10(tmp_path, np.random.default_rng(0))
    with caplog.at_level(logging.WARNING, logger="mlflow_tg.train.data"):
        load_data(data_cfg("cifar10", tmp_path, "data.verify_checksums=false"))
    assert "data.verify_checksums=false" in caplog.text
    assert "unpickles" in caplog.text and "run any code" in caplog.text
    with pytest.raises(DataNotFoundError) as error:  # checksums on: refused, risk named
        load_data(data_cfg("cifar10", tmp_path))
    assert "verify_checksums=false" in str(error.value) and "run any code" in str(error.value)


def test_checksums_on_or_files_without_pickles_do_not_warn(tmp_path, caplog):
    from mlflow_tg.train.data import load_data
    from tests.test_data import data_cfg, write_svhn

    write_svhn(tmp_path, np.random.default_rng(0))
    with caplog.at_level(logging.WARNING, logger="mlflow_tg.train.data"):
        load_data(data_cfg("svhn", tmp_path, "data.verify_checksums=false"))
        load_data(data_cfg("digits"))
    assert "unpickles" not in caplog.text


def test_ending_a_run_is_retried_while_the_store_is_busy(monkeypatch, tmp_path):
    import mlflow
    from mlflow.entities import RunStatus
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    import mlflow_tg.tracking.run as tracked

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = MlflowClient().create_experiment("busy")
    real, calls = MlflowClient.set_terminated, []

    def busy_twice(self, run_id, status=None, end_time=None):  # as a sweep-mate's write would
        calls.append(status)
        if len(calls) <= 2:
            raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)
        return real(self, run_id, status, end_time)

    monkeypatch.setattr(MlflowClient, "set_terminated", busy_twice)
    monkeypatch.setattr(tracked.time, "sleep", lambda seconds: None)
    try:
        run = mlflow.start_run(experiment_id=experiment)
        tracked.end_run(tracked.SigtermGuard(), RunStatus.KILLED)  # MLflow's own end_run first
        assert calls == ["KILLED"] * 3 and mlflow.active_run() is None
        assert MlflowClient().get_run(run.info.run_id).info.status == "KILLED"

        def refused(self, run_id, status=None, end_time=None):
            raise MlflowException("no such run", error_code=INVALID_PARAMETER_VALUE)

        monkeypatch.setattr(MlflowClient, "set_terminated", refused)
        mlflow.start_run(experiment_id=experiment)
        with pytest.raises(MlflowException, match="no such run"):  # only a busy store retries
            tracked.end_run(tracked.SigtermGuard(), RunStatus.KILLED)
    finally:
        mlflow.set_tracking_uri(previous)
