"""A real tracking server for parallel sweeps: PostgreSQL behind ``mlflow server``.

``python -m mlflow_tg.tracking.server start`` (``make server-start``):

1. PostgreSQL: Debian's cluster (``pg_lsclusters``; the newest version's first cluster, or
   ``MLFLOW_TG_PG_CLUSTER=15/main``) is started with ``pg_ctlcluster`` unless it is already
   online. Without PostgreSQL on the machine, root installs Debian's ``postgresql`` with apt;
   anyone else gets the ``sudo apt-get install`` line to run.
2. The role and the database (both ``mlflow_tg`` by default) are created when absent; the
   role's password is ``$MLFLOW_TG_DB_PASSWORD`` (default ``mlflow_tg``: the database only
   listens on 127.0.0.1, so the default is for one machine's local use; set your own anywhere
   else).
3. ``mlflow server --backend-store-uri postgresql+psycopg2://… --artifacts-destination …
   --host 127.0.0.1 --port 5000 --workers 2`` starts in the background (its own session), with
   its pid file, its log and, by default, its artifacts under ``.server/`` (git-ignored). The
   password reaches it as ``PGPASSWORD`` in its environment, never on its command line.
4. ``start`` returns once ``/health`` answers; after ``timeout`` seconds without an answer, or
   when the server exits, it stops what it started and fails with the end of the server's log.

``start --auth`` (``make server-start AUTH=1``) runs MLflow's basic auth (``--app-name
basic-auth``): the admin user (``$MLFLOW_TG_ADMIN_USER``, default ``admin``) gets the password
in ``$MLFLOW_TG_ADMIN_PASSWORD``, which must be set (12 characters at least): never a default
one. Its config (``basic_auth.ini``: users in ``basic_auth.db``, READ by default) and the
Flask secret key live in the state folder, readable by their owner only. ``--host``,
``--allowed-hosts`` and ``--cors-allowed-origins`` go to ``mlflow server`` as they are.

``stop`` ends the MLflow server (SIGTERM to its process group, SIGKILL after 30 s) and stops
PostgreSQL only when ``start`` had started it. ``status`` says what runs. Train against it with
``python train.py tracking=server`` (``conf/tracking/server.yaml``: http://127.0.0.1:5000).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

STATE_DIR = Path(".server")
DEFAULT_PORT = 5000  # conf/tracking/server.yaml's tracking.uri
DEFAULT_PASSWORD = "mlflow_tg"  # local use only: PostgreSQL listens on 127.0.0.1
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
PG_BIN = Path("/usr/lib/postgresql")
LOG_TAIL = 3000  # characters of the server log shown when it does not start
ADMIN_PASSWORD_ENV, ADMIN_USER_ENV = "MLFLOW_TG_ADMIN_PASSWORD", "MLFLOW_TG_ADMIN_USER"
MIN_PASSWORD = 12  # MLflow's own rule for basic-auth passwords
LEGACY_PASSWORD = "password1234"  # the admin password older MLflow versions shipped: public


class ServerError(RuntimeError):
    """The server could not be started or stopped; the message says why and what to do."""


@dataclass
class Settings:
    """Where PostgreSQL and the MLflow server run, and where their files go."""

    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"
    workers: int = 2
    state_dir: Path = STATE_DIR
    artifacts: Path | None = None  # None: <state_dir>/artifacts
    db_name: str = "mlflow_tg"
    db_user: str = "mlflow_tg"
    db_password: str = field(
        default_factory=lambda: os.environ.get("MLFLOW_TG_DB_PASSWORD") or DEFAULT_PASSWORD,
        repr=False,
    )
    db_host: str = "127.0.0.1"
    db_port: int | None = None  # None: the Debian cluster's port
    # The Debian cluster to start ("15/main"); "" uses a PostgreSQL that is already running at
    # db_port (the tests' throwaway cluster) and leaves it alone.
    cluster: str | None = field(default_factory=lambda: os.environ.get("MLFLOW_TG_PG_CLUSTER"))
    admin_socket_dir: str | None = None  # psql -h for the superuser's connection
    timeout_s: float = 180.0
    auth: bool = False  # MLflow's basic auth, the admin password from $MLFLOW_TG_ADMIN_PASSWORD
    allowed_hosts: str | None = None  # mlflow server --allowed-hosts
    cors_allowed_origins: str | None = None  # mlflow server --cors-allowed-origins

    @property
    def auth_file(self) -> Path:
        """The basic-auth config MLflow reads (``MLFLOW_AUTH_CONFIG_PATH``)."""
        return self.state_dir / "basic_auth.ini"

    @property
    def pid_file(self) -> Path:
        """The MLflow server's pid (its process group id too)."""
        return self.state_dir / "mlflow.pid"

    @property
    def log_file(self) -> Path:
        """The MLflow server's output."""
        return self.state_dir / "mlflow.log"

    @property
    def postgres_file(self) -> Path:
        """Present when ``start`` started the Debian cluster (``stop`` then stops it)."""
        return self.state_dir / "postgres.json"

    @property
    def artifact_dir(self) -> Path:
        """Where the server keeps the runs' artifacts (absolute)."""
        return (self.artifacts or self.state_dir / "artifacts").resolve()

    @property
    def url(self) -> str:
        """The tracking URI clients use."""
        return f"http://{self.host}:{self.port}"

    def backend_uri(self, password: bool = False) -> str:
        """The SQLAlchemy URI of the database, with the password only when asked for."""
        secret = f":{self.db_password}" if password else ""
        return (
            f"postgresql+psycopg2://{self.db_user}{secret}@{self.db_host}:{self.db_port}/"
            f"{self.db_name}"
        )


# --- PostgreSQL ---------------------------------------------------------------------------


def as_postgres(command: list[str]) -> list[str]:
    """``command`` run as the ``postgres`` OS user (PostgreSQL's superuser, peer auth)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    if os.environ.get("USER") == "postgres":
        return command
    return ["sudo", "-u", "postgres", *command]


def run(command: list[str], what: str, stdin: str | None = None) -> str:
    """Run a command; ServerError with its output when it fails."""
    try:
        done = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ServerError(f"{what} failed: {error}") from error
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()[-LOG_TAIL:]
        raise ServerError(f"{what} failed (exit {done.returncode}): {output}")
    return done.stdout


def install_postgres() -> None:
    """Install Debian's ``postgresql`` with apt as root; otherwise say what to run."""
    if os.geteuid() != 0:
        raise ServerError(
            "PostgreSQL is not installed and this is not root. Run:\n"
            "  sudo apt-get update && sudo apt-get install -y postgresql\n"
            "then make server-start again."
        )
    print("Installing Debian's postgresql with apt-get", file=sys.stderr)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    commands = [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]]
    for command in commands:
        if subprocess.run(command, env=env, check=False).returncode != 0:
            raise ServerError(f"{' '.join(command)} failed; install postgresql by hand.")


def clusters() -> list[dict[str, str]]:
    """Debian's PostgreSQL clusters (``pg_lsclusters``), newest version first."""
    out = run(["pg_lsclusters", "--no-header"], "pg_lsclusters")
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            found.append(
                {"version": parts[0], "name": parts[1], "port": parts[2], "status": parts[3]}
            )
    return sorted(found, key=lambda c: -float(c["version"]))


def start_postgres(settings: Settings) -> None:
    """Start Debian's cluster unless it is online; set ``settings.db_port`` to its port."""
    if shutil.which("pg_lsclusters") is None:
        install_postgres()
    found = clusters()
    if settings.cluster:
        found = [c for c in found if f"{c['version']}/{c['name']}" == settings.cluster]
    if not found:
        wanted = settings.cluster or "any"
        raise ServerError(
            f"no PostgreSQL cluster ({wanted}) on this machine (pg_lsclusters lists none); "
            "create one: sudo pg_createcluster 15 main"
        )
    cluster = found[0]
    settings.db_port = settings.db_port or int(cluster["port"])
    if cluster["status"] != "online":
        command = ["pg_ctlcluster", cluster["version"], cluster["name"], "start"]
        run(command if os.geteuid() == 0 else ["sudo", *command], "starting PostgreSQL")
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        settings.postgres_file.write_text(json.dumps(cluster))
        print(f"PostgreSQL {cluster['version']}/{cluster['name']} started", file=sys.stderr)
    wait_for_postgres(settings)


def wait_for_postgres(settings: Settings, timeout_s: float = 60) -> None:
    """Wait until PostgreSQL accepts connections on ``db_host:db_port``."""
    ready = pg_tool("pg_isready")
    deadline = time.monotonic() + timeout_s
    while True:
        command = [ready, "-q", "-h", settings.db_host, "-p", str(settings.db_port)]
        if subprocess.run(command, check=False).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise ServerError(
                f"PostgreSQL does not accept connections on {settings.db_host}:"
                f"{settings.db_port} after {timeout_s:.0f} s (see pg_lsclusters and its log)."
            )
        time.sleep(0.5)


def pg_tool(name: str) -> str:
    """A PostgreSQL client program: on PATH, or in Debian's newest /usr/lib/postgresql/N/bin."""
    if found := shutil.which(name):
        return found
    versions = sorted(PG_BIN.glob("*/bin"), key=lambda p: float(p.parent.name), reverse=True)
    for folder in versions:
        if (folder / name).exists():
            return str(folder / name)
    raise ServerError(f"{name} is not installed (Debian's postgresql-client has it).")


def sql_literal(text: str) -> str:
    """``text`` as a SQL string literal (standard_conforming_strings: only quotes double)."""
    return "'" + text.replace("'", "''") + "'"


def ensure_database(settings: Settings) -> None:
    """Create the role and the database when absent; (re)set the role's password.

    The SQL goes to ``psql`` on stdin, so the password is on no command line.
    """
    for name in (settings.db_user, settings.db_name):
        if not IDENTIFIER.fullmatch(name):
            raise ServerError(f"{name!r} is not allowed as a role or database name: [a-z_0-9]")
    user, db, password = settings.db_user, settings.db_name, sql_literal(settings.db_password)
    script = f"""
SELECT 'CREATE ROLE {user} LOGIN' WHERE NOT EXISTS
  (SELECT 1 FROM pg_roles WHERE rolname = '{user}') \\gexec
ALTER ROLE {user} WITH LOGIN PASSWORD {password};
SELECT 'CREATE DATABASE {db} OWNER {user}' WHERE NOT EXISTS
  (SELECT 1 FROM pg_database WHERE datname = '{db}') \\gexec
"""
    psql = [pg_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres"]
    psql += ["-p", str(settings.db_port)]
    if settings.admin_socket_dir:
        psql += ["-h", settings.admin_socket_dir]
    run(as_postgres(psql), f"creating the role and database {db!r}", stdin=script)


def stop_postgres(settings: Settings) -> None:
    """Stop the Debian cluster if ``start`` started it."""
    if not settings.postgres_file.exists():
        return
    cluster = json.loads(settings.postgres_file.read_text())
    command = ["pg_ctlcluster", cluster["version"], cluster["name"], "stop"]
    run(command if os.geteuid() == 0 else ["sudo", *command], "stopping PostgreSQL")
    settings.postgres_file.unlink()
    print(f"PostgreSQL {cluster['version']}/{cluster['name']} stopped", file=sys.stderr)


# --- the MLflow server --------------------------------------------------------------------


def answers(url: str, timeout_s: float = 2) -> bool:
    """Whether ``url`` answers HTTP 200 now."""
    try:
        return requests.get(url, timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def running_pid(settings: Settings) -> int | None:
    """The pid of the MLflow server ``start`` left running, or None (a stale file is removed)."""
    try:
        pid = int(settings.pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        cmdline, pid = b"", None
    if pid is not None and b"mlflow" in cmdline and b"server" in cmdline:
        return pid
    settings.pid_file.unlink(missing_ok=True)
    return None


def log_tail(settings: Settings) -> str:
    """The end of the server's log."""
    try:
        return settings.log_file.read_text(errors="replace")[-LOG_TAIL:]
    except OSError:
        return "(no log)"


def admin_password() -> str:
    """The admin password of the basic auth, from the environment; ServerError when unusable."""
    password = os.environ.get(ADMIN_PASSWORD_ENV, "")
    if len(password) < MIN_PASSWORD or password == LEGACY_PASSWORD:
        shown = "unset" if not password else f"{len(password)} characters long"
        raise ServerError(
            f"${ADMIN_PASSWORD_ENV} is {shown}: a server with basic auth (--auth, AUTH=1) needs "
            f"its admin password there, at least {MIN_PASSWORD} characters and not MLflow's "
            f"old public default. Set it (export {ADMIN_PASSWORD_ENV}='…') and start again; "
            "nothing was started."
        )
    return password


def auth_environment(settings: Settings) -> dict[str, str]:
    """The basic auth's config file and secrets, as ``mlflow server``'s environment.

    The password only reaches MLflow through its environment (``MLFLOW_AUTH_ADMIN_PASSWORD``),
    never a file or a command line; it creates the admin user on the first start.
    """
    password = admin_password()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    users = (settings.state_dir / "basic_auth.db").resolve()
    users.touch(mode=0o600, exist_ok=True)  # made here, so that MLflow's umask never applies
    users.chmod(0o600)
    write_private(
        settings.auth_file,
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{users}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    key_file = settings.state_dir / "flask_secret_key"
    if not key_file.exists():  # kept across restarts: sessions of the UI stay valid
        write_private(key_file, secrets.token_hex(32))
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(settings.auth_file.resolve()),
        "MLFLOW_AUTH_ADMIN_USERNAME": os.environ.get(ADMIN_USER_ENV) or "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
        or key_file.read_text().strip(),
    }


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def server_command(settings: Settings) -> list[str]:
    """The ``mlflow server`` command line (no secret on it)."""
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", settings.backend_uri(),
        "--artifacts-destination", str(settings.artifact_dir),
        "--host", settings.host, "--port", str(settings.port),
        "--workers", str(settings.workers),
    ]  # fmt: skip
    if settings.auth:
        command += ["--app-name", "basic-auth"]
    if settings.allowed_hosts:
        command += ["--allowed-hosts", settings.allowed_hosts]
    if settings.cors_allowed_origins:
        command += ["--cors-allowed-origins", settings.cors_allowed_origins]
    return command


def start_mlflow(settings: Settings) -> int:
    """Start ``mlflow server`` on the database in the background; return its pid when ready."""
    if (pid := running_pid(settings)) is not None:
        if answers(f"{settings.url}/health"):
            print(f"MLflow server already running (pid {pid}) at {settings.url}", file=sys.stderr)
            return pid
        raise ServerError(
            f"an MLflow server of {settings.state_dir} (pid {pid}) runs but {settings.url}/health "
            "does not answer; stop it first: make server-stop"
        )
    if answers(f"{settings.url}/health", timeout_s=1):
        raise ServerError(
            f"something already answers at {settings.url} (not started from "
            f"{settings.state_dir}); stop it or choose another port (SERVER_PORT=…)."
        )
    auth = auth_environment(settings) if settings.auth else {}
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    command = server_command(settings)
    bin_dir = str(Path(sys.executable).parent)  # mlflow server execs uvicorn from the venv
    env = (
        os.environ
        | auth
        | {
            "PGPASSWORD": settings.db_password,  # libpq reads it: no password in the URI or `ps`
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    with open(settings.log_file, "w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: stop() ends its workers too
        )
    settings.pid_file.write_text(f"{process.pid}\n")
    deadline = time.monotonic() + settings.timeout_s
    while not answers(f"{settings.url}/health"):
        if process.poll() is not None or time.monotonic() > deadline:
            why = (
                f"exited with code {process.returncode}"
                if process.returncode is not None
                else f"did not answer {settings.url}/health within {settings.timeout_s:.0f} s"
            )
            stop_mlflow(settings)
            raise ServerError(
                f"the MLflow server {why}. The end of its log ({settings.log_file}):\n"
                f"{log_tail(settings)}"
            )
        time.sleep(0.5)
    return process.pid


def stop_mlflow(settings: Settings, grace_s: float = 30) -> bool:
    """End the MLflow server and its workers; False when none was running."""
    pid = running_pid(settings)
    if pid is None:
        return False
    signal_group(pid, signal.SIGTERM)  # the group start_new_session made: pid is its id
    deadline = time.monotonic() + grace_s
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_members(pid):
        signal_group(pid, signal.SIGKILL)
    settings.pid_file.unlink(missing_ok=True)
    return True


def signal_group(pgid: int, signum: int) -> None:
    """Send ``signum`` to every process of the group, if any is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, from /proc."""
    with contextlib.suppress(ChildProcessError):  # our child (started in this process)
        os.waitpid(pgid, os.WNOHANG)
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(proc.name))
    return members


# --- the commands -------------------------------------------------------------------------


def start(settings: Settings) -> None:
    """PostgreSQL, the role and database, then the MLflow server; returns once it answers."""
    if settings.auth:
        admin_password()  # refused before anything starts
    if settings.cluster == "":
        if settings.db_port is None:
            raise ServerError("with an external PostgreSQL (cluster ''), give its db_port")
        wait_for_postgres(settings)
    else:
        start_postgres(settings)
    ensure_database(settings)
    pid = start_mlflow(settings)
    print(
        f"MLflow tracking server (pid {pid}) at {settings.url}, backend "
        f"{settings.backend_uri()}, artifacts in {settings.artifact_dir}, log "
        f"{settings.log_file}. Train against it: .venv/bin/python train.py tracking=server"
        + ("" if settings.port == DEFAULT_PORT else f" tracking.uri={settings.url}")
        + (
            " (basic auth: export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
            if settings.auth
            else ""
        ),
        file=sys.stderr,
    )


def stop(settings: Settings) -> None:
    """The MLflow server, then PostgreSQL if ``start`` started it."""
    stopped = stop_mlflow(settings)
    print("MLflow server stopped" if stopped else "no MLflow server was running", file=sys.stderr)
    stop_postgres(settings)


def status(settings: Settings) -> bool:
    """Print what runs; True when the MLflow server answers."""
    pid = running_pid(settings)
    healthy = answers(f"{settings.url}/health")
    print(
        json.dumps(
            {
                "pid": pid,
                "url": settings.url,
                "healthy": healthy,
                "postgres_started_here": settings.postgres_file.exists(),
                "log": str(settings.log_file),
            }
        )
    )
    return healthy


def parser() -> argparse.ArgumentParser:
    """The command line."""
    cli = argparse.ArgumentParser(
        prog="python -m mlflow_tg.tracking.server", description=__doc__.splitlines()[0]
    )
    cli.add_argument("command", choices=["start", "stop", "status"])
    defaults = Settings()
    cli.add_argument("--port", type=int, default=defaults.port, help="MLflow server port")
    cli.add_argument("--workers", type=int, default=defaults.workers)
    cli.add_argument("--state-dir", type=Path, default=defaults.state_dir)
    cli.add_argument("--artifacts", type=Path, help="default: <state-dir>/artifacts")
    cli.add_argument("--db-port", type=int, help="default: the Debian cluster's port")
    cli.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds")
    cli.add_argument(
        "--auth",
        action="store_true",
        help=f"MLflow's basic auth; the admin password comes from ${ADMIN_PASSWORD_ENV}",
    )
    cli.add_argument("--host", default=defaults.host, help="address to bind (127.0.0.1)")
    cli.add_argument("--allowed-hosts", help="mlflow server --allowed-hosts (Host headers)")
    cli.add_argument("--cors-allowed-origins", help="mlflow server --cors-allowed-origins")
    return cli


def main(argv: list[str] | None = None) -> None:
    """``start``, ``stop`` or ``status``; a failure prints one message and exits 1."""
    args = parser().parse_args(argv)
    settings = Settings(
        port=args.port,
        workers=args.workers,
        state_dir=args.state_dir,
        artifacts=args.artifacts,
        db_port=args.db_port,
        timeout_s=args.timeout,
        auth=args.auth,
        host=args.host,
        allowed_hosts=args.allowed_hosts,
        cors_allowed_origins=args.cors_allowed_origins,
    )
    try:
        if args.command == "start":
            start(settings)
        elif args.command == "stop":
            stop(settings)
        elif not status(settings):
            sys.exit(1)
    except ServerError as error:
        print(f"server {args.command}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
