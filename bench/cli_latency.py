"""Wall time of one ``mlflow-tg predict`` call, as a user types it: median of 5 calls.

    python bench/cli_latency.py [--store DIR] [--tracking-uri URI --run-id RUN] [--calls 5]

Against the small store of ``small_store.py`` (made in DIR, default
``$TMPDIR/mlflow_tg-bench-store``, or reused), or any store and run given. Four ways: the
store's SQLite file with the registered version answering in the process (``sqlite3`` and the
version's answerer, no MLflow); the same through MLflow's client, for comparison (the store's
URI with ``?timeout=30``, a driver option the command leaves to MLflow); the SQLite file with a
``mlflow models serve`` endpoint started here; and that endpoint with a ``mlflow server`` on the
store (``--tracking-uri http://…``: plain HTTP). Prints each one's median wall time and median
CPU time (user + system) of the command, which a loaded machine inflates less.

A store whose champion was registered before versions carried ``answerer.pkl`` is answered
through MLflow's client on every path: give such a store's benches a new ``--store`` folder.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests
from small_store import DEFAULT_STORE, make_store

BIN = Path(sys.executable).parent


def timed(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``command`` (which must succeed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def start(arguments: list[str], ready: str, uri: str) -> subprocess.Popen:
    """An ``mlflow`` server process (its own process group), once ``ready`` answers."""
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        [str(BIN / "mlflow"), *arguments], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    for _ in range(480):
        try:
            if requests.get(ready, timeout=1).ok:
                return server
        except requests.RequestException:
            time.sleep(0.5)
    stop(server)
    raise RuntimeError(f"mlflow {arguments[0]} did not start")


def serve(model: str, uri: str, port: int) -> subprocess.Popen:
    """``mlflow models serve`` of ``model``, ready."""
    arguments = ["models", "serve", "-m", model, "--env-manager", "local", "-h", "127.0.0.1",
                 "-p", str(port)]  # fmt: skip
    return start(arguments, f"http://127.0.0.1:{port}/ping", uri)


def tracking_server(uri: str, port: int) -> subprocess.Popen:
    """``mlflow server`` on the store, ready."""
    arguments = ["server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
                 str(port), "--workers", "1"]  # fmt: skip
    return start(arguments, f"http://127.0.0.1:{port}/health", uri)


def stop(server: subprocess.Popen) -> None:
    """Stop the server and whatever it started (its own process group)."""
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def main() -> None:
    """Time both paths and print the medians."""
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--store", type=Path, default=DEFAULT_STORE)
    cli.add_argument("--tracking-uri", help="another store (with --run-id)")
    cli.add_argument("--run-id")
    cli.add_argument("--calls", type=int, default=5)
    cli.add_argument("--ports", type=int, nargs=2, default=[5199, 5196])
    args = cli.parse_args()
    store = make_store(args.store) if not args.tracking_uri else {}
    uri, run_id = args.tracking_uri or store["uri"], args.run_id or store["run_id"]
    command = [str(BIN / "mlflow-tg"), "predict", "--run-id", run_id, "--tracking-uri", uri]
    endpoint, tracking = (f"http://127.0.0.1:{port}" for port in args.ports)
    servers = [serve("models:/tg-performance-predictor@champion", uri, args.ports[0])]
    try:
        servers.append(tracking_server(uri, args.ports[1]))
        over_http = [*command[:-1], tracking, "--endpoint", endpoint]
        through_mlflow = [*command[:-1], f"{uri}?timeout=30"]
        paths = {
            "SQLite store, model in process": command,
            "SQLite store through MLflow's client, model in process": through_mlflow,
            "SQLite store, endpoint": [*command, "--endpoint", endpoint],
            "tracking server, endpoint (HTTP only)": over_http,
        }
        for name, call in paths.items():
            timed(call)  # warm the disk cache
            times = [timed(call) for _ in range(args.calls)]
            wall = statistics.median(t[0] for t in times)
            cpu = statistics.median(t[1] for t in times)
            print(f"mlflow-tg predict, {name}: median of {args.calls} calls {wall:.2f} s wall, "
                  f"{cpu:.2f} s CPU (load average {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} cores)")  # fmt: skip
    finally:
        for server in servers:
            stop(server)


if __name__ == "__main__":
    main()
