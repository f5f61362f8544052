"""A sweep stopped by SIGTERM: every running job's run ends KILLED, and no job starts after.

A scheduler or ``kill`` signals the process that launched the sweep. With Hydra's basic
launcher the jobs run in that process, and the run's own handler (``SigtermGuard``) ends it.
With the joblib launcher they run in worker processes that the signal does not reach: left
alone they would train on, orphaned, and end FINISHED. So the launching process passes SIGTERM
on to its child processes, and a worker whose run was ended this way returns from the job
instead of raising (an exception back in joblib would make it SIGKILL the sibling workers,
whose runs are still ending). For the same reason the signal goes only to workers that handle
it (those that have run a job): one that has not would die of it. From then on no job starts
a run, in any worker (a file in the sweep's folder says so), so the sweep drains in
seconds. A run whose worker dies all the same is ended by the launching process (``sweep.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import NoReturn, TypeVar

from mlflow_tg.tracking import sweep
from mlflow_tg.tracking.run import Terminated
from mlflow_tg.tracking.sweep import in_worker, stat_fields

log = logging.getLogger(__name__)
T = TypeVar("T")
STOPPING = threading.Event()  # this process got SIGTERM: it starts no more jobs
IN_JOB = threading.Event()  # this process is running a job (train.py's main), before its run
WORKER = threading.Event()  # this process has run a job as a worker of the launching process


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc; none where there is no /proc)."""
    children = []
    for path in Path("/proc").glob("[0-9]*"):
        fields = stat_fields(int(path.name))
        if fields is not None and int(fields[1]) == pid:  # None: the process is gone
            children.append(int(path.name))
    return children


def handles_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler (from /proc: its caught-signals mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone
        return False
    caught = next(
        (line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), "0"
    )
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def on_sigterm(signum: int, frame: object) -> None:
    """Stop: this process's own job at once, else the workers' jobs (passed on to them).

    A job of this process before its run's own handler is in place (loading data, tracing the
    graph) stops with ``Terminated`` and no run; so does a launching process with no worker to
    pass the signal to (another launcher's, a sweep still starting), as without this handler.
    """
    STOPPING.set()
    if orphaned() and not IN_JOB.is_set():
        leave(128 + signum)
    if in_worker():
        if not IN_JOB.is_set():
            return  # between jobs: the next ones do not start (raising would kill the worker)
    elif not orphaned():
        with suppress(OSError):
            sweep.stop_all()
        workers = [child for child in child_processes(os.getpid()) if handles_sigterm(child)]
        for worker in workers:  # a worker that never ran a job would die of it: not those
            with suppress(ProcessLookupError):  # gone meanwhile
                os.kill(worker, signum)
        if workers and not IN_JOB.is_set():
            return  # the launching process waits for its workers' runs to end
    raise Terminated(signum, outcome="no run of this process was training")


def stopping() -> bool:
    """Whether no job should start: this process or the sweep's launching process got SIGTERM."""
    return STOPPING.is_set() or sweep.stopping()


def install() -> None:
    """Handle SIGTERM with ``on_sigterm`` in this process, between runs (main thread only)."""
    with suppress(ValueError):  # not the main thread: SIGTERM stays as it was
        signal.signal(signal.SIGTERM, on_sigterm)


def start_launcher() -> None:
    """In the process that launches jobs: name it to its jobs, and handle SIGTERM."""
    sweep.start()
    install()


def orphaned() -> bool:
    """Whether this is a worker whose launching process is gone (SIGKILL): it was reparented."""
    return WORKER.is_set() and not in_worker()


def leave(code: int) -> NoReturn:
    """Exit this orphaned worker now: no process will give it a job or take its result.

    Joblib's workers would otherwise wait for one for ever, holding their memory.
    """
    log.warning("the sweep's launching process is gone: this worker exits")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def watch_launcher(every_s: float = 5.0) -> None:
    """In a worker: leave once the launching process is gone and no job runs here."""
    while not (orphaned() and not IN_JOB.is_set()):
        time.sleep(every_s)
    leave(0)


def run_job(job: Callable[[], T]) -> T | None:
    """``job()``, as one job of a sweep that SIGTERM may stop; None when it did, in a worker.

    A worker returns rather than raises (see the module docstring); once stopped, it starts no
    more jobs. Elsewhere ``Terminated`` goes on up, and the process exits 143.
    """
    if in_worker() and not WORKER.is_set():
        WORKER.set()
        install()
        threading.Thread(target=watch_launcher, name="mlflow_tg-orphan", daemon=True).start()
    if stopping():
        log.warning("SIGTERM came: this job does not start (no run)")
        return None
    IN_JOB.set()
    try:
        return job()
    except Terminated as terminated:  # the run, if it had started, ended KILLED
        if not in_worker():
            raise
        STOPPING.set()
        log.warning("%s: %s; this worker starts no more jobs", terminated, terminated.outcome)
        return None
    finally:
        IN_JOB.clear()
        if orphaned():  # its run has ended; the launching process died meanwhile
            leave(0)


def end_launcher() -> list[str]:
    """End the runs of lost workers (one line for each), and remove the sweep's folder."""
    return sweep.finish()


def stop_workers() -> None:
    """Shut joblib's worker processes down now, once idle, rather than after their timeout."""
    loky = sys.modules.get("joblib.externals.loky")
    if loky is not None:
        loky.get_reusable_executor().shutdown(wait=True)
