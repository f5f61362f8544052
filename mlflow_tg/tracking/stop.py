"""A sweep stopped by SIGTERM: every running job's run ends KILLED, and no job starts after.

A scheduler or ``kill`` signals the process that launched the sweep. With Hydra's basic
launcher the jobs run in that process, and the run's own handler (``SigtermGuard``) ends it.
With the joblib launcher they run in worker processes that the signal does not reach: left
alone they would train on, orphaned, and end FINISHED. So the launching process passes SIGTERM
on to its child processes, and a worker whose run was ended this way returns from the job
instead of raising (an exception back in joblib would make it SIGKILL the sibling workers,
whose runs are still ending). Every process that got SIGTERM then skips the jobs it is given,
without a run, so the sweep drains in seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import suppress
from pathlib import Path

log = logging.getLogger(__name__)
SWEEP_PID = "MLFLOW_TG_SWEEP_PID"  # the launching process, in its jobs' environment
STOPPING = threading.Event()  # this process got SIGTERM: it starts no more jobs


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc; none where there is no /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process is gone
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def on_sigterm(signum: int, frame: object) -> None:
    """Note the stop, and pass it on to this process's children (the sweep's workers)."""
    STOPPING.set()
    for child in child_processes(os.getpid()):
        with suppress(ProcessLookupError):  # gone meanwhile
            os.kill(child, signum)


def install() -> None:
    """Handle SIGTERM with ``on_sigterm`` in this process, between runs (main thread only)."""
    with suppress(ValueError):  # not the main thread: SIGTERM stays as it was
        signal.signal(signal.SIGTERM, on_sigterm)


def start_launcher() -> None:
    """In the process that launches jobs: name it to its jobs, and handle SIGTERM."""
    os.environ[SWEEP_PID] = str(os.getpid())
    install()


def in_worker() -> bool:
    """Whether this job runs in a process other than the one that launched it."""
    launcher = os.environ.get(SWEEP_PID)
    return launcher is not None and launcher != str(os.getpid())


def stop_workers() -> None:
    """Shut joblib's worker processes down now, once idle, rather than after their timeout."""
    loky = sys.modules.get("joblib.externals.loky")
    if loky is not None:
        loky.get_reusable_executor().shutdown(wait=True)
