"""End the runs whose process died without a word: RUNNING, their heartbeat stale.

A process killed by SIGKILL (the OOM killer, a node lost) cannot end its run, and MLflow keeps
it RUNNING for ever. Every mlflow_tg training run renews its ``mlflow_tg.heartbeat`` tag every
``tracking.heartbeat_s`` seconds (60 by default) while its process lives, also through a
server outage once the server is back. ``mlflow-tg reap --older-than 10m`` ends each RUNNING
run whose heartbeat is older than that KILLED, at the time of its last heartbeat, and says why
in its ``mlflow_tg.reaped`` tag. Runs without a heartbeat (not started by mlflow_tg's
``train.py``) are left alone. The heartbeat is the training machine's clock: keep the limit
well above the heartbeat interval plus any clock skew between machines.

Imports MLflow only (no torch): the command answers in seconds.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from mlflow_tg import keys

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
RUNNING = "attributes.status = 'RUNNING'"


class ReapError(ValueError):
    """Bad input to ``reap``: the message names the value and what is allowed."""


@dataclass
class Verdict:
    """One RUNNING run as the reaper sees it."""

    run_id: str
    name: str
    heartbeat: float | None  # unix seconds of its last heartbeat; None: it has none
    age_s: float | None


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d`` in seconds; ReapError on anything else."""
    found = DURATION.fullmatch(text.strip().lower())
    seconds = float(found.group(1)) * UNITS[found.group(2) or "s"] if found else 0.0
    if seconds <= 0:
        raise ReapError(
            f"--older-than {text!r} is not allowed: give a duration above 0, a number with an "
            "optional unit s, m, h or d (for example --older-than 10m). Keep it well above the "
            "runs' tracking.heartbeat_s (60 s by default)."
        )
    return seconds


def heartbeat_time(value: str | None) -> float | None:
    """The heartbeat tag (``2026-11-25T16:04:19Z``) in unix seconds; None when absent or bad."""
    if not value:
        return None
    try:
        moment = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return moment.replace(tzinfo=timezone.utc).timestamp()


def running_runs(client: MlflowClient, experiment: str | None) -> list[Run]:
    """Every RUNNING run of ``experiment`` (every experiment when None)."""
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ReapError(
                f"--experiment {experiment!r} is not in the tracking store "
                f"{client.tracking_uri}: give the name of one of its experiments, or leave "
                "--experiment out to look at all of them."
            )
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs, token = [], None
    while ids:
        page = client.search_runs(ids, RUNNING, max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    return runs


def judge(run: Run, now: float) -> Verdict:
    """The run's last heartbeat and its age."""
    beat = heartbeat_time(run.data.tags.get(keys.HEARTBEAT))
    return Verdict(
        run.info.run_id,
        run.info.run_name or "",
        beat,
        None if beat is None else now - beat,
    )


def reap(
    client: MlflowClient, older_than_s: float, experiment: str | None = None, dry_run: bool = False
) -> tuple[list[Verdict], list[Verdict]]:
    """End RUNNING runs with a heartbeat older than ``older_than_s`` KILLED.

    Returns (reaped, without a heartbeat); with ``dry_run`` nothing is changed.
    """
    now = time.time()
    verdicts = [judge(run, now) for run in running_runs(client, experiment)]
    stale = [v for v in verdicts if v.age_s is not None and v.age_s > older_than_s]
    if not dry_run:
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for verdict in stale:
            again = client.get_run(verdict.run_id)
            if again.info.status != "RUNNING" or judge(again, now).heartbeat != verdict.heartbeat:
                continue  # it beat, or ended, since the search
            why = (
                f"no heartbeat for {verdict.age_s:.0f} s (limit {older_than_s:.0f} s): its "
                f"process died without ending it; ended KILLED by mlflow-tg reap at {stamp}"
            )
            client.set_tag(verdict.run_id, keys.REAPED, why)
            client.set_terminated(verdict.run_id, "KILLED", end_time=int(verdict.heartbeat * 1000))
    return stale, [v for v in verdicts if v.heartbeat is None]
