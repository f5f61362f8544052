"""The processes of one sweep: the launching process, and the workers that run its jobs.

Joblib's launcher runs each job in a worker process that the launching process started. When
one worker dies (the OOM killer, a signal to the whole process group, a crash), joblib kills
the others at once, mid-run: none of them can end its run, and MLflow would keep every one
RUNNING. So while a worker runs a job, its run is enrolled in a folder of the launching
process (the run's id, its spool folder, the worker's pid). A worker that ends its run, in any
way, takes it out again. What is left once the sweep is over belongs to a worker that died:
the launching process delivers what the run's journal holds (every epoch journaled before the
worker died) and ends the run KILLED, its ``mlflow_tg.reaped`` tag saying why. If the store
does not answer, the run's end joins its journal for ``mlflow-tg replay``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from mlflow_tg import keys
from mlflow_tg.tracking.spool import SpoolError, journal_end, read_journal, replay

log = logging.getLogger(__name__)
SWEEP_PID = "MLFLOW_TG_SWEEP_PID"  # the launching process, in its jobs' environment
DEATH_WAIT_S = 10.0  # how long a lost worker is waited for to be gone, once the sweep is over


def in_worker() -> bool:
    """Whether this process is a worker that the launching process started (joblib's).

    Its direct child: the jobs of other launchers (submitit's, SLURM's on other machines) are
    not, and end their runs themselves.
    """
    return os.environ.get(SWEEP_PID) == str(os.getppid())


def marker(launcher: str) -> Path:
    """The file that tells a sweep's workers that its launching process got SIGTERM."""
    return Path(tempfile.gettempdir()) / f"mlflow_tg.sweep-{launcher}.stopping"


def enrolment(launcher: str) -> Path:
    """The folder where a sweep's workers enrol the runs they are running."""
    return Path(tempfile.gettempdir()) / f"mlflow_tg.sweep-{launcher}.runs"


def enrol(run_id: str, spool_folder: Path) -> None:
    """In a worker: note that this process runs ``run_id`` (nothing elsewhere)."""
    if not in_worker():
        return
    folder = enrolment(os.environ[SWEEP_PID])
    folder.mkdir(exist_ok=True)
    entry = {"spool": str(spool_folder), "pid": os.getpid()}
    (folder / f"{run_id}.tmp").write_text(json.dumps(entry))
    (folder / f"{run_id}.tmp").rename(folder / run_id)  # whole, or not there


def unenrol(run_id: str) -> None:
    """In a worker: its run has ended (or its end waits in the spool for a replay)."""
    if in_worker():
        (enrolment(os.environ[SWEEP_PID]) / run_id).unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def gone(pid: int, wait_s: float) -> bool:
    """Whether process ``pid`` is gone, waiting up to ``wait_s`` for it."""
    deadline = time.monotonic() + wait_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def end_lost_run(spool: Path, pid: int) -> str:
    """Deliver a dead worker's run from its journal and end it KILLED; say what was done."""
    try:
        run_id, delivered = replay(spool)
    except SpoolError as error:  # the store is away: the end waits in the journal
        journal_end(spool, RunStatus.KILLED)
        return (
            f"its writes could not be delivered ({error}); its end (KILLED) is journaled too: "
            f"deliver both with mlflow-tg replay {spool}"
        )
    client = MlflowClient(read_journal(spool)[0]["uri"])
    if client.get_run(run_id).info.status != "RUNNING":
        return f"{delivered} journaled writes delivered; it had ended"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    client.set_tag(
        run_id,
        keys.REAPED,
        f"its joblib worker process (pid {pid}) died while it ran (the OOM killer, a signal, "
        "or joblib stopping the sweep's workers after another one died); ended KILLED by the "
        f"sweep's launching process at {stamp}",
    )
    client.set_terminated(run_id, "KILLED")
    return f"{delivered} journaled writes delivered, ended KILLED"


def end_lost_runs(launcher: str, wait_s: float = DEATH_WAIT_S) -> list[str]:
    """In the launching process, once the sweep is over: end the runs of workers that died.

    Returns one line per run. A run whose worker still lives after ``wait_s`` is left alone
    (``mlflow-tg reap`` ends it once its heartbeat is stale).
    """
    folder = enrolment(launcher)
    if not folder.is_dir():
        return []
    lines = []
    for entry in sorted(folder.iterdir()):
        if entry.suffix == ".tmp":
            continue
        enrolled = json.loads(entry.read_text())
        if not gone(enrolled["pid"], wait_s):
            lines.append(f"run {entry.name}: its worker (pid {enrolled['pid']}) still runs")
            continue
        try:
            done = end_lost_run(Path(enrolled["spool"]), enrolled["pid"])
        except (MlflowException, SpoolError, OSError) as error:
            done = f"could not be ended ({error}); mlflow-tg reap ends it once it is stale"
        lines.append(f"run {entry.name}: {done}")
        entry.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    return lines


def tally_file(launcher: str) -> Path:
    """The file where a sweep's jobs note that they ran, or were refused (one word a line)."""
    return Path(tempfile.gettempdir()) / f"mlflow_tg.sweep-{launcher}.jobs"


def tally(event: str) -> None:
    """Note one job of this sweep (``job``) or one refused for bad input (``refused``).

    Appended by whichever process runs the job (the launching one, or a worker), so the
    launching process counts them all; jobs on other machines (submitit) are not counted.
    """
    if (launcher := os.environ.get(SWEEP_PID)) is not None:
        with open(tally_file(launcher), "a") as tallied:  # one short append: whole lines
            tallied.write(f"{event}\n")


def tallied(launcher: str) -> dict[str, int]:
    """How many jobs of the sweep noted each event."""
    try:
        words = tally_file(launcher).read_text().split()
    except OSError:
        return {}
    return {word: words.count(word) for word in set(words)}


def worker_died(error: BaseException) -> bool:
    """Whether ``error`` is joblib's report that one of its worker processes died."""
    loky = sys.modules.get("joblib.externals.loky.process_executor")
    return loky is not None and isinstance(error, loky.TerminatedWorkerError)
