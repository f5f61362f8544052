"""Whether a tracking server answers: one probe of ``/health``, waited for a few seconds.

Light (``requests`` only), so that the ``mlflow-tg`` command can ask before it imports MLflow,
whose client retries a server that does not answer for minutes.
"""

from __future__ import annotations

import os
import time

import requests

from mlflow_tg.errors import shown_uri
from mlflow_tg.tracking.sqlite import missing_store

SERVER_PROBE_S = 10.0  # how long a tracking server that does not answer /health is waited for
TIMEOUT_DRIVERS = ("psycopg2", "psycopg", "pymysql", "mysqldb")  # take connect_timeout=seconds


def tls_verify() -> bool | str:
    """TLS verification as MLflow's own settings ask for it."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


def unanswered(uri: str, timeout_s: float = SERVER_PROBE_S) -> str | None:
    """Why the server at ``uri`` did not answer ``/health`` within ``timeout_s``; None if it did.

    Any HTTP answer below 500 counts (a server behind authentication answers 401).
    """
    health = f"{uri.rstrip('/')}/health"
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            answer = requests.get(health, timeout=max(0.5, min(3.0, left)), verify=tls_verify())
            if answer.status_code < 500:
                return None
            why = f"{health} answers HTTP {answer.status_code}"
        except requests.RequestException as error:
            why = f"{type(error).__name__} on {health}"
        if time.monotonic() + 1 > deadline:
            return f"{why}, {timeout_s:.0f} s"
        time.sleep(1)


def unreachable_database(uri: str, timeout_s: float = SERVER_PROBE_S) -> str | None:
    """Why the PostgreSQL or MySQL database at ``uri`` gives no connection; None if it does.

    MLflow would retry it for minutes, then print a traceback. The driver's wait is bounded
    (per address the host name resolves to) where the driver takes ``connect_timeout`` and the
    URI does not set one itself; other databases and SQLite are not probed.
    """
    if not uri.lower().startswith(("postgresql", "mysql")):
        return None
    import sqlalchemy  # MLflow's; imported only when a database URI needs it

    engine = None
    try:
        url = sqlalchemy.engine.make_url(uri)
        bounded = url.get_dialect().driver in TIMEOUT_DRIVERS and "connect_timeout" not in url.query
        options = {"connect_timeout": int(timeout_s)} if bounded else {}
        engine = sqlalchemy.create_engine(url, connect_args=options)
        with engine.connect():
            return None
    except Exception as error:  # the driver's own: refused, timed out, bad password, bad URI
        cause = getattr(error, "orig", None) or error
        first = next((line for line in str(cause).splitlines() if line.strip()), "")
        return f"{type(cause).__name__}: {first.strip()}".replace(uri, shown_uri(uri))
    finally:
        if engine is not None:
            engine.dispose()


def database_refused(uri: str, why: str, named_as: str) -> str:
    """The paragraph for a database URI that gave no connection (``named_as``: how it was set)."""
    return (
        f"{named_as}{shown_uri(uri)!r}: no connection to the database ({why}). Check that it "
        "runs, and the user, password and database the URI names (make server-start starts "
        "PostgreSQL on 127.0.0.1 with the role and database mlflow_tg), or train on the "
        "embedded store: tracking=local."
    )


def access_refused(status: int | None) -> str | None:
    """What to do about a server that refused who asked (HTTP 401 or 403); None for others."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        who = f"the user {user!r} with that password" if user else "requests without credentials"
        return (
            f"the tracking server does not accept {who} (HTTP 401): set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD to one of its users"
        )
    if status == 403:
        who = f"the user {user!r}" if user else "this client"
        return (
            f"the tracking server does not let {who} do this (HTTP 403): an admin can grant "
            "EDIT on the experiment, or on the registered model for the predictor (README, "
            "Access control), or use a user who has it"
        )
    return None


def refused_access(error: BaseException) -> str | None:
    """``access_refused`` for an MLflow client's error; None when it is about something else."""
    status_of = getattr(error, "get_http_status_code", None)  # MlflowException's
    return access_refused(status_of()) if callable(status_of) else None


def store_unreachable(uri: str) -> str | None:
    """Why nothing can be read at ``uri``: no server or database answers, or no SQLite file.

    MLflow's client would wait minutes for the first two, and make an empty store for the last.
    """
    shown = shown_uri(uri)
    if uri.startswith(("http://", "https://")):
        why = unanswered(uri)
        return None if why is None else f"no MLflow tracking server answers at {shown} ({why})"
    if (why := unreachable_database(uri)) is not None:
        return f"no connection to the database at {shown} ({why})"
    missing = missing_store(uri)
    return None if missing is None else f"no tracking store at {uri} ({missing} does not exist)"
