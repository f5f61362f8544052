"""Servers the tests start for real: an MLflow tracking server, ``mlflow models serve``, a
throwaway PostgreSQL cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    """A TCP port nobody listens on right now, on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    """Whether ``url`` answers HTTP 200 now.

    A stopped server refuses at once; a running one on a loaded machine may take seconds.
    """
    try:
        return requests.get(url, timeout=15).status_code == 200
    except requests.RequestException:
        return False


@contextmanager
def running_server(
    arguments: list[str], ready_url: str, log: Path, env: dict | None = None, timeout_s: float = 180
) -> Iterator[subprocess.Popen]:
    """Start a server process, wait until ``ready_url`` answers 200, and always stop it.

    Its output goes to ``log``: a pipe nobody reads fills up and blocks a chatty server.
    """
    with open(log, "w") as output:
        # its own process group: `mlflow server` and `mlflow models serve` start workers
        process = subprocess.Popen(
            arguments, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not answers(ready_url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{arguments[:4]} did not start: {log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield process
        finally:
            stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group, SIGKILL after 30 s."""
    for signal_number, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def mlflow_server_command(store: str, artifacts: Path, port: int, workers: int = 1) -> list[str]:
    """``mlflow server`` on ``store`` (a backend URI), serving artifacts from ``artifacts``."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store,
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def crash(process: subprocess.Popen) -> None:
    """SIGKILL a server's whole process group, as a crash or the OOM killer would end it."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def postgres_bin() -> Path | None:
    """Debian's newest /usr/lib/postgresql/N/bin with initdb, if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: float(p.parents[1].name))  # fmt: skip
    return found[-1].parent if found else None


def can_run_postgres() -> bool:
    """Whether a throwaway cluster can be made here: root, Debian's PostgreSQL, runuser."""
    return os.geteuid() == 0 and postgres_bin() is not None and bool(shutil.which("runuser"))


def as_postgres(*command: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True)


@contextmanager
def throwaway_postgres() -> Iterator[tuple[int, Path]]:
    """A PostgreSQL cluster of its own: (port, socket folder); stopped and removed after.

    initdb and pg_ctl run as the ``postgres`` user (PostgreSQL refuses root) in a folder it
    owns, on a free loopback port: the machine's own cluster is never touched.
    """
    binaries = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="mlflow_tg_pg.", dir="/tmp"))
    shutil.chown(folder, "postgres")
    folder.chmod(0o700)
    port, data = free_port(), folder / "data"
    try:
        as_postgres(str(binaries / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth-local=peer", "--auth-host=scram-sha-256")  # fmt: skip
        options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={folder}"
        as_postgres(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"),
                    "-w", "-o", options, "start")  # fmt: skip
        yield port, folder
    finally:
        if (data / "postmaster.pid").exists():
            as_postgres(str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
