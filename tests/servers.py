"""Servers the tests start for real: an MLflow tracking server, ``mlflow models serve``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
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
    """Whether ``url`` answers HTTP 200 now."""
    try:
        return requests.get(url, timeout=1).status_code == 200
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
