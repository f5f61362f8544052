"""``mlflow-tg reap`` and ``mlflow-tg replay``: the tracking store's clean-up after failures.

``reap --older-than 10m`` ends the RUNNING runs whose heartbeat is stale KILLED (their process
died by SIGKILL, see ``reap.py``); ``replay FOLDER`` delivers what a run's spool folder holds
and its store lacks (after an outage that outlasted the run, see ``spool.py``). Both import
MLflow only when they run, and never torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from mlflow_tg.tracking.records import EMBEDDED_URI, SERVER_URI

COMMANDS = ("reap", "replay")


def tracking_uri_argument(command: argparse.ArgumentParser, default: str | None) -> None:
    """``--tracking-uri``, defaulting to ``$MLFLOW_TRACKING_URI`` then ``default``."""
    fallback = os.environ.get("MLFLOW_TRACKING_URI") or default
    where = default or "the store the folder names"
    command.add_argument(
        "--tracking-uri",
        default=fallback,
        help=f"the tracking store (default: $MLFLOW_TRACKING_URI or {where})",
    )


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``reap`` and ``replay`` to the ``mlflow-tg`` command line."""
    reap = commands.add_parser(
        "reap",
        help="end RUNNING runs whose heartbeat is stale (their process was killed) KILLED",
    )
    reap.add_argument(
        "--older-than",
        required=True,
        help="a heartbeat older than this is stale: 90s, 10m, 2h, 1d (keep it well above the "
        "runs' tracking.heartbeat_s, 60 s by default)",
    )
    reap.add_argument("--experiment", help="only this experiment (default: all)")
    reap.add_argument("--dry-run", action="store_true", help="list the stale runs, change none")
    tracking_uri_argument(reap, EMBEDDED_URI)
    replay = commands.add_parser(
        "replay", help="deliver what a run's spool folder holds and its tracking store lacks"
    )
    replay.add_argument("folder", help="the run's spool folder (outputs/<date>/<time>/spool)")
    tracking_uri_argument(replay, None)


def run_command(args: argparse.Namespace) -> int:
    """Run ``reap`` or ``replay``; bad input prints one paragraph and returns 2."""
    from mlflow_tg.tracking.quiet import quiet

    quiet(False)
    from mlflow_tg.tracking.health import refused_access
    from mlflow_tg.tracking.reap import ReapError
    from mlflow_tg.tracking.spool import SpoolError

    try:
        return reap_command(args) if args.command == "reap" else replay_command(args)
    except (ReapError, SpoolError) as error:
        print(f"mlflow-tg {args.command}: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if (refused := refused_access(error)) is None:
            raise
        print(f"mlflow-tg {args.command}: {args.tracking_uri}: {refused}", file=sys.stderr)
        return 2


def reap_command(args: argparse.Namespace) -> int:
    """Print one line per run ended (or, with ``--dry-run``, to end)."""
    from mlflow import MlflowClient

    from mlflow_tg.tracking.health import store_unreachable
    from mlflow_tg.tracking.reap import ReapError, parse_duration, reap

    older_than = parse_duration(args.older_than)
    if (why := store_unreachable(args.tracking_uri)) is not None:
        raise ReapError(f"{why}: give the store the runs were logged to with --tracking-uri "
                        f"(the server of `make server-start`: {SERVER_URI}).")  # fmt: skip
    client = MlflowClient(args.tracking_uri)
    stale, silent = reap(client, older_than, args.experiment, args.dry_run)
    verb = "would end" if args.dry_run else "ended"
    for verdict in stale:
        print(f"{verb} KILLED: run {verdict.run_id} ({verdict.name}), no heartbeat for "
              f"{verdict.age_s:.0f} s")  # fmt: skip
    runs = "run" if len(stale) == 1 else "runs"
    print(f"{len(stale)} stale {runs} {verb.split()[-1]} KILLED; {len(silent)} RUNNING runs "
          "without a heartbeat left alone")  # fmt: skip
    return 0


def replay_command(args: argparse.Namespace) -> int:
    """Deliver a spool folder; say how much it delivered."""
    from pathlib import Path

    from mlflow_tg.tracking.spool import replay

    run_id, count = replay(Path(args.folder), args.tracking_uri)
    print(f"run {run_id}: {count} records delivered" if count else
          f"run {run_id}: the store had everything already")  # fmt: skip
    return 0
