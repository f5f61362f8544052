"""The processes of one sweep: the launching process, and the workers that run its jobs.

The launching process makes a private folder (mode 700) and names it, with its pid, to every
job in the environment. The folder holds what the processes of the sweep tell each other:
``stopping`` (it got SIGTERM: no job starts after it), ``jobs`` (one word per job run or
refused, for the count at the end) and ``runs/`` (the runs that workers are running).

Joblib's launcher runs each job in a worker process that the launching process started. When
one worker dies (the OOM killer, a signal to the whole process group, a crash), joblib kills
the others at once, mid-run: none of them can end its run, and MLflow would keep every one
RUNNING. So a worker enrols its run in ``runs/`` before the run writes anything and takes it
out once the run has ended (or its end waits in the spool for ``mlflow-tg replay``). What is
left there once the sweep is over belongs to a worker that died: the launching process
delivers what the run's journal holds (every epoch journaled before the worker died) and ends
the run KILLED, its ``mlflow_tg.reaped`` tag saying why. If the store does not answer, the
run's end joins its journal for ``mlflow-tg replay``.

The launching process removes its folder at its end. One that was killed (SIGKILL) cannot: the
next one ends the runs left there in the same way, once no worker of that sweep lives, and
removes the folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunStatus

from mlflow_tg import keys
from mlflow_tg.tracking.health import store_unreachable
from mlflow_tg.tracking.spool import (
    JOURNAL,
    MAX_TAG_LENGTH,
    SpoolError,
    journal_end,
    read_journal,
    replay,
)

log = logging.getLogger(__name__)
SWEEP_PID = "MLFLOW_TG_SWEEP_PID"  # the launching process, in its jobs' environment
SWEEP_DIR = "MLFLOW_TG_SWEEP_DIR"  # its private folder, the same
FOLDER_PREFIX = "mlflow_tg.sweep-"  # in the temporary folder, then the launcher's pid
LAUNCHER = "launcher"  # in the folder: the launching process's pid and start time
MAKING_S = 60.0  # a folder without its launcher file for longer was made by earlier code
DEATH_WAIT_S = 10.0  # how long a lost worker is waited for to be gone, once the sweep is over


def start() -> None:
    """In the launching process: make the sweep's folder and name it to the jobs."""
    remove_stale_folders()
    me = os.getpid()
    where = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{me}."))
    launcher = {"pid": me, "started": started_at(me), "host": socket.gethostname(),
                "boot": boot_id()}  # fmt: skip
    (where / "launcher.tmp").write_text(json.dumps(launcher))
    (where / "launcher.tmp").replace(where / LAUNCHER)  # whole, or not there
    os.environ[SWEEP_PID] = str(me)
    os.environ[SWEEP_DIR] = str(where)


def boot_id() -> str | None:
    """The id of the boot (Linux): a pid and start time name a process within one boot only."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def remove_stale_folders() -> None:
    """End what this user's killed sweeps left, and remove their folders.

    A folder is stale once its launching process is gone (SIGKILL, a crash, a reboot), and no
    worker of it lives on: orphaned workers finish their runs first. A run still enrolled there
    lost its worker too: it gets what its journal holds and ends KILLED, as the launching
    process would have done (``end_lost_runs``). Folders made on another machine (a shared
    temporary folder) are left alone: their processes cannot be seen from here.
    """
    for where in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        try:
            status = where.lstat()  # a link planted there is not followed
            if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
                continue
            launcher = launcher_of(where)
            if launcher["host"] != socket.gethostname() or lives(launcher):
                continue
            if workers_live(where, launcher["boot"]):
                continue
            lines = end_lost_runs(where, wait_s=0)
        except (OSError, ValueError, KeyError, TypeError):  # being made now, or not this code's
            continue  # (or cleared meanwhile by another process starting at the same time)
        for line in lines:
            log.warning("a killed sweep's %s", line)
        shutil.rmtree(where, ignore_errors=True)


def launcher_of(where: Path) -> dict:
    """The launching process a sweep folder names: pid, start time, host and boot.

    A folder that earlier code made, without the file, names only its pid: whatever process
    has that pid now is taken for it (kept, to be safe). One without the file that is younger
    than ``MAKING_S`` is being made: FileNotFoundError.
    """
    try:
        return json.loads((where / LAUNCHER).read_text())
    except FileNotFoundError:
        if time.time() - where.lstat().st_mtime < MAKING_S:
            raise
    pid = int(where.name.removeprefix(FOLDER_PREFIX).split(".")[0])
    return {"pid": pid, "started": started_at(pid), "host": socket.gethostname(),
            "boot": boot_id()}  # fmt: skip


def lives(process: dict) -> bool:
    """Whether the process a sweep folder names (pid, start time, boot) still runs."""
    return process.get("boot") == boot_id() and not gone(process["pid"], process["started"], 0)


def workers_live(where: Path, boot: str | None) -> bool:
    """Whether a worker that enrolled a run in the sweep folder ``where`` still runs.

    ``boot``: the launching process's boot, which its workers share.
    """
    runs = where / "runs"
    entries = [p for p in runs.iterdir() if p.suffix != ".tmp"] if runs.is_dir() else []
    return any(lives(json.loads(entry.read_text()) | {"boot": boot}) for entry in entries)


def folder() -> Path | None:
    """The sweep's folder, where this process can reach it (not on another machine)."""
    named = os.environ.get(SWEEP_DIR)
    return Path(named) if named and Path(named).is_dir() else None


def in_worker() -> bool:
    """Whether this process is a worker that the launching process started (joblib's).

    Its direct child: the jobs of other launchers (submitit's, SLURM's on other machines) are
    not, and end their runs themselves.
    """
    return os.environ.get(SWEEP_PID) == str(os.getppid())


def in_sweep() -> bool:
    """Whether this process is the launching process, or one of its workers."""
    return in_worker() or os.environ.get(SWEEP_PID) == str(os.getpid())


def stop_all() -> None:
    """Tell every process of the sweep that no job starts any more."""
    if (where := folder()) is not None:
        (where / "stopping").touch()


def stopping() -> bool:
    """Whether the launching process told the sweep to stop."""
    return (where := folder()) is not None and (where / "stopping").exists()


def tally(event: str) -> None:
    """Note one job of this sweep (``job``) or one refused for bad input (``refused``).

    Appended by whichever process runs the job (the launching one, or a worker), so that the
    launching process counts them all; jobs on other machines (submitit's) are not counted.
    """
    if in_sweep() and (where := folder()) is not None:
        with open(where / "jobs", "a") as tallied:  # one short append: whole lines
            tallied.write(f"{event}\n")


def tallied() -> dict[str, int]:
    """How many jobs of the sweep noted each event."""
    try:
        words = (folder() / "jobs").read_text().split()
    except (OSError, TypeError):  # nothing noted; no folder
        return {}
    return {word: words.count(word) for word in set(words)}


def stat_fields(pid: int) -> list[str] | None:
    """Process ``pid``'s /proc stat after its name (state, parent, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def started_at(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot); None when it is gone or a zombie."""
    fields = stat_fields(pid)
    return None if fields is None or fields[0] in ("Z", "X") else int(fields[19])


def enrol(run_id: str, spool_folder: Path, uri: str) -> None:
    """In a worker, before its run writes anything: note that this process runs ``run_id``."""
    if not in_worker() or (where := folder()) is None:
        return
    runs = where / "runs"
    entry = {"spool": str(spool_folder), "uri": uri, "pid": os.getpid(),
             "started": started_at(os.getpid())}  # fmt: skip
    try:
        runs.mkdir(exist_ok=True)
        (runs / f"{run_id}.tmp").write_text(json.dumps(entry))
        (runs / f"{run_id}.tmp").replace(runs / run_id)  # whole, or not there
    except OSError as error:  # the folder went meanwhile (its launching process was killed)
        log.debug("run %s not enrolled in %s: %s", run_id, where, error)


def unenrol(run_id: str) -> None:
    """The run has ended (or its end waits in the spool): no longer a lost worker's."""
    if (where := folder()) is not None:
        (where / "runs" / run_id).unlink(missing_ok=True)


def gone(pid: int, started: int | None, wait_s: float) -> bool:
    """Whether process ``pid`` (started at ``started``) is gone, waiting up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while (now := started_at(pid)) is not None and now == started:  # a new one: pid reused
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def lost_because(pid: int) -> str:
    """Why the launching process ended a run (its ``mlflow_tg.reaped`` tag)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"its joblib worker process (pid {pid}) died while it ran (the OOM killer, a signal, "
        "or joblib stopping the sweep's workers after another one died); ended KILLED by the "
        f"sweep's launching process at {stamp}"
    )


def end_lost_run(run_id: str, spool: Path, uri: str, pid: int, why: str | None) -> str:
    """Deliver a dead worker's run from its journal and end it KILLED; say what was done.

    ``why``: why the store cannot be reached, or None when it can.
    """
    journaled, trouble = False, ""
    if (spool / JOURNAL).is_file():
        try:  # a folder used again (a fixed hydra.run.dir) may hold another run's journal
            journaled = read_journal(spool)[0]["run_id"] == run_id
        except SpoolError as error:  # the run ends all the same
            trouble = f"; its journal cannot be read: {error}"
    if why is not None:
        if not journaled:
            return f"still RUNNING ({why}); mlflow-tg reap ends it once its heartbeat is stale"
        if journal_end(spool, RunStatus.KILLED, {keys.REAPED: lost_because(pid)}):
            waits = "its writes and its end (KILLED) wait"
        else:
            waits = "its writes and its own end wait"
        return f"{why}: {waits} in {spool}; deliver them with mlflow-tg replay {spool}"
    done = ""
    if journaled:
        try:
            done = f"{replay(spool, uri)[1]} journaled writes delivered, "
        except SpoolError as error:  # the store refused a write for good: the run ends anyway
            trouble = f"; the store refused part of its journal: {error}"
    client = MlflowClient(uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return f"{done}it had ended{trouble}"
    client.set_tag(run_id, keys.REAPED, f"{lost_because(pid)}{trouble}"[:MAX_TAG_LENGTH])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    return f"{done}ended KILLED{trouble}"


def end_lost_runs(where: Path | None = None, wait_s: float = DEATH_WAIT_S) -> list[str]:
    """Once a sweep is over: end the runs of its workers that died.

    In its launching process (``where``: this sweep's folder), or in a later one for a sweep
    whose launching process was killed. Returns one line per run. A run whose worker still
    lives after ``wait_s`` is left alone (``mlflow-tg reap`` ends it once its heartbeat is
    stale).
    """
    where = where or folder()
    if where is None or not (runs := where / "runs").is_dir():
        return []
    lines, seen, unreachable = [], set(), {}  # a server down is waited for once, not per run
    while entries := sorted(p for p in runs.iterdir() if p.suffix != ".tmp" and p not in seen):
        for entry in entries:  # listed again after: a worker may have enrolled while dying
            seen.add(entry)
            try:
                enrolled = json.loads(entry.read_text())
                if not gone(enrolled["pid"], enrolled["started"], wait_s):
                    done = f"its worker (pid {enrolled['pid']}) still runs"
                else:
                    uri = enrolled["uri"]
                    if uri not in unreachable:
                        unreachable[uri] = store_unreachable(uri)
                    done = end_lost_run(entry.name, Path(enrolled["spool"]), uri,
                                        enrolled["pid"], unreachable[uri])  # fmt: skip
            except Exception as error:  # one run that cannot be ended does not stop the others
                done = f"not ended ({type(error).__name__}: {error}); mlflow-tg reap ends it"
            lines.append(f"run {entry.name}: {done}")
    return lines


def finish() -> list[str]:
    """In the launching process, at its end: end lost workers' runs, then remove the folder.

    Ctrl-C and SIGTERM wait meanwhile: the runs are being ended.
    """
    if (where := folder()) is None:
        return []
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return end_lost_runs()
    finally:
        shutil.rmtree(where, ignore_errors=True)
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def worker_died(error: BaseException) -> bool:
    """Whether ``error`` is joblib's report that one of its worker processes died."""
    loky = sys.modules.get("joblib.externals.loky.process_executor")
    return loky is not None and isinstance(error, loky.TerminatedWorkerError)
