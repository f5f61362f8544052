"""The tracking server of ``make server-start`` for real: PostgreSQL, ``mlflow server``, a run.

Each test module run starts a throwaway PostgreSQL cluster of its own (initdb and pg_ctl as the
``postgres`` user, in a folder it owns, on a free port; PostgreSQL refuses to run as root), so
the machine's own cluster is never touched.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from mlflow import MlflowClient

from mlflow_tg import keys
from mlflow_tg.tracking import server
from mlflow_tg.tracking.health import unreachable_database
from tests.conftest import CONF_DIR
from tests.servers import answers, can_run_postgres, free_port, throwaway_postgres

ROOT = CONF_DIR.parent


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[int, Path]]:
    """A throwaway PostgreSQL cluster: (port, socket folder); stopped and removed after."""
    if not can_run_postgres():
        pytest.skip("needs root and Debian's PostgreSQL (apt-get install postgresql)")
    with throwaway_postgres() as found:
        yield found


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


@pytest.mark.slow
def test_the_database_probe_connects_and_names_a_refused_password(postgres, tmp_path):
    server.ensure_database(settings_for(postgres, tmp_path / "state", "the right one"))
    where = f"127.0.0.1:{postgres[0]}/mlflow_tg"
    database = "postgresql+psycopg2://mlflow_tg:{}@" + where
    assert unreachable_database(database.format("the%20right%20one")) is None
    why = unreachable_database(database.format("a%20wrong%20one"))
    assert why.startswith("OperationalError") and "password authentication failed" in why, why


def test_make_targets_call_the_module():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("start", "stop"):
        recipe = re.search(rf"^server-{target}:.*\n\t(.+)$", makefile, re.MULTILINE).group(1)
        assert f"-m mlflow_tg.tracking.server {target}" in recipe
    assert (ROOT / ".gitignore").read_text().count("/.server/") == 1


def test_basic_auth_refuses_to_start_without_an_admin_password(tmp_path, monkeypatch):
    settings = server.Settings(port=free_port(), state_dir=tmp_path / "state", auth=True)
    for value in (None, "short", server.LEGACY_PASSWORD):
        if value is None:
            monkeypatch.delenv(server.ADMIN_PASSWORD_ENV, raising=False)
        else:
            monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, value)
        with pytest.raises(server.ServerError) as error:
            server.start(settings)
        assert server.ADMIN_PASSWORD_ENV in str(error.value)
        assert "nothing was started" in str(error.value)
        assert not settings.pid_file.exists() and not settings.postgres_file.exists()


def test_the_auth_config_holds_no_password_and_only_its_owner_reads_it(tmp_path, monkeypatch):
    password = "a-long-admin-secret"
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, password)
    settings = server.Settings(state_dir=tmp_path / "state", auth=True)
    env = server.auth_environment(settings)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == password
    assert password not in settings.auth_file.read_text()
    assert settings.auth_file.stat().st_mode & 0o077 == 0
    assert (settings.state_dir / "basic_auth.db").stat().st_mode & 0o077 == 0
    assert "--app-name" in server.server_command(settings)
    assert password not in " ".join(server.server_command(settings))
    assert (
        server.auth_environment(settings)["MLFLOW_FLASK_SERVER_SECRET_KEY"]
        == (env["MLFLOW_FLASK_SERVER_SECRET_KEY"])
    )  # one key across restarts


def refused_in_one_paragraph(url: str, folder: Path, run_id: str):
    """A function: the paragraph a command prints when the server refuses its user (exit 2)."""
    commands = {
        "train": [sys.executable, str(ROOT / "train.py"), "model=mlp", "width=2", "epochs=1",
                  "graph=off", f"tracking.uri={url}", "tracking.experiment=shared"],
        "reap": [str(Path(sys.executable).parent / "mlflow-tg"), "reap", "--older-than", "1h",
                 "--tracking-uri", url],
        "predict": [str(Path(sys.executable).parent / "mlflow-tg"), "predict", "--run-id",
                    run_id, "--tracking-uri", url],
    }  # fmt: skip

    def paragraph(command: str) -> str:
        result = subprocess.run(commands[command], cwd=folder, capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
        return result.stderr

    return paragraph


@pytest.mark.slow
def test_a_reader_of_an_experiment_reads_it_and_cannot_write(postgres, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    admin_password = "the admin's own secret"
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, admin_password)
    settings = settings_for(postgres, tmp_path / "state", "db password")
    settings.auth = True
    server.start(settings)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
        admin = MlflowClient(settings.url)
        experiment = admin.create_experiment("shared")
        run_id = admin.create_run(experiment).info.run_id
        admin.log_metric(run_id, "val_acc", 0.5)
        users = AuthServiceClient(settings.url)
        users.create_user("reader", "reader's password")
        users.grant_user_permission("reader", "experiment", experiment, "READ")

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "reader's password")
        reader = MlflowClient(settings.url)
        assert reader.get_experiment(experiment).name == "shared"
        (run,) = reader.search_runs([experiment])
        assert run.data.metrics == {"val_acc": 0.5}
        for write in (
            lambda: reader.create_run(experiment),
            lambda: reader.log_metric(run_id, "val_acc", 0.9),
            lambda: reader.set_tag(run_id, "mine", "no"),
        ):
            with pytest.raises(MlflowException) as error:
                write()
            assert error.value.get_http_status_code() == 403, error.value
        assert admin.get_run(run_id).data.metrics == {"val_acc": 0.5}

        assert (settings.state_dir / "basic_auth.db").stat().st_mode & 0o077 == 0  # users
        paragraph = refused_in_one_paragraph(settings.url, tmp_path, run_id)
        assert "HTTP 403" in paragraph("train") and "EDIT" in paragraph("train")

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a wrong password")
        with pytest.raises(MlflowException) as error:
            MlflowClient(settings.url).get_experiment(experiment)
        assert error.value.get_http_status_code() == 401
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        for command in ("train", "reap", "predict"):
            assert "HTTP 401" in paragraph(command), command
            assert "MLFLOW_TRACKING_USERNAME" in paragraph(command), command
        pid = server.running_pid(settings)
        assert admin_password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        server.stop(settings)
