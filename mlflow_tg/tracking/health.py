"""Whether a tracking server answers: one probe of ``/health``, waited for a few seconds.

Light (``requests`` only), so that the ``mlflow-tg`` command can ask before it imports MLflow,
whose client retries a server that does not answer for minutes.
"""

from __future__ import annotations

import os
import time

import requests

SERVER_PROBE_S = 10.0  # how long a tracking server that does not answer /health is waited for


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
