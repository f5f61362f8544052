"""The tracking server of ``make server-start`` for real: PostgreSQL, ``mlflow server``, a run.

Each test module run starts a throwaway PostgreSQL cluster of its own (initdb and pg_ctl as the
``postgres`` user, in a folder it owns, on a free port; PostgreSQL refuses to run as root), so
the machine's own cluster is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from mlflow import MlflowClient

from mlflow_tg import keys
from mlflow_tg.tracking import server
from tests.conftest import CONF_DIR
from tests.servers import answers, free_port

ROOT = CONF_DIR.parent


def postgres_bin() -> Path | None:
    """Debian's newest /usr/lib/postgresql/N/bin with initdb, if any."""
    found = sorted(server.PG_BIN.glob("*/bin/initdb"), key=lambda p: float(p.parents[1].name))
    return found[-1].parent if found else None


def as_postgres(*command: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[int, Path]]:
    """A throwaway PostgreSQL cluster: (port, socket folder); stopped and removed after."""
    binaries = postgres_bin()
    if os.geteuid() != 0 or binaries is None or shutil.which("runuser") is None:
        pytest.skip("needs root and Debian's PostgreSQL (apt-get install postgresql)")
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


def settings_for(postgres: tuple[int, Path], state: Path, password: str) -> server.Settings:
    port, socket_dir = postgres
    return server.Settings(
        port=free_port(),
        state_dir=state,
        cluster="",  # the throwaway cluster runs already; start/stop leave it alone
        db_port=port,
        admin_socket_dir=str(socket_dir),
        db_password=password,
        timeout_s=300,
    )


@pytest.mark.slow
def test_started_server_keeps_a_real_training_run_in_postgres_and_stops(postgres, tmp_path):
    password = "it's s3cret"  # a quote: the SQL must quote it
    settings = settings_for(postgres, tmp_path / "state", password)
    server.start(settings)
    pid = server.running_pid(settings)
    try:
        assert pid is not None and answers(f"{settings.url}/health")
        assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        server.ensure_database(settings)  # again: role and database exist, nothing fails
        result = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "model=mlp", "width=2", "epochs=2",
             "graph=off", "device=cpu", "tracking=server", f"tracking.uri={settings.url}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        client = MlflowClient(settings.url)
        (run,) = client.search_runs([client.get_experiment_by_name("mlflow_tg").experiment_id])
        assert run.info.status == "FINISHED"
        assert {"val_acc", "train_loss", "test_acc"} <= set(run.data.metrics)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert sorted(steps) == [0, 1, 2]
        assert list(settings.artifact_dir.rglob(keys.HISTORY))  # proxied into the folder
        with psycopg2.connect(
            host="127.0.0.1", port=settings.db_port, dbname="mlflow_tg", user="mlflow_tg",
            password=password,
        ) as db, db.cursor() as cursor:  # fmt: skip
            cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            assert cursor.fetchone() == ("FINISHED",)
    finally:
        server.stop(settings)
    assert not answers(f"{settings.url}/health")
    assert server.group_members(pid) == [] and not settings.pid_file.exists()


@pytest.mark.slow
def test_a_server_that_cannot_start_fails_with_its_log_and_leaves_nothing(postgres, tmp_path):
    server.ensure_database(settings_for(postgres, tmp_path / "ok", "the right one"))
    settings = settings_for(postgres, tmp_path / "state", "a wrong one")
    settings.timeout_s = 120
    with pytest.raises(server.ServerError) as error:
        server.start_mlflow(settings)
    message = str(error.value)
    assert "exited with code" in message and "password authentication failed" in message
    assert str(settings.log_file) in message
    assert not settings.pid_file.exists() and not answers(f"{settings.url}/health")


def test_make_targets_call_the_module():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("start", "stop"):
        recipe = re.search(rf"^server-{target}:.*\n\t(.+)$", makefile, re.MULTILINE).group(1)
        assert f"-m mlflow_tg.tracking.server {target}" in recipe
    assert (ROOT / ".gitignore").read_text().count("/.server/") == 1
