"""``mlflow-tg predict --run-id RUN [--endpoint URL]``: predicted final accuracy of a run.

A thin client of the registered model, which takes runs: it fetches the run's history and
params, sends them (to the endpoint, or to the version loaded in this process), logs the answer
to the run (``predicted/test_acc``, its interval and the out-of-distribution flag, at step = the
window used) and prints it. A finished run tagged ``diverged`` needs no prediction: its final
accuracy is known, and that is the answer.

``mlflow-tg serve`` checks that the store has the registered version, then hands over to
``mlflow models serve`` for it (``make serve``).

Fast and quiet: nothing heavy is imported before the arguments are read, nothing on the path
imports torch, and MLflow's logs and progress bars stay off unless ``--verbose``. MLflow itself
is imported only where needed (``stores.py``): with a tracking server (``http(s)://``) and an
endpoint, the command is plain HTTP (``rest.py``); with a local SQLite store, plain ``sqlite3``
(``tracking/sqlite.py``) and the version's own answerer.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

from mlflow_tg import keys
from mlflow_tg.errors import Refusal, RegistryError
from mlflow_tg.predictor.describe import predicted_metrics, with_note
from mlflow_tg.predictor.endpoint import EndpointError
from mlflow_tg.serve.answer import KNOWN, describe, known_answer
from mlflow_tg.serve.rest import TrackingServerError
from mlflow_tg.serve.stores import MlflowStore, Store, answer_here, open_store
from mlflow_tg.tracking.commands import COMMANDS as TRACKING_COMMANDS
from mlflow_tg.tracking.commands import add_commands as add_tracking_commands
from mlflow_tg.tracking.commands import run_command as run_tracking_command
from mlflow_tg.tracking.health import (
    database_refused,
    refused_access,
    unanswered,
    unreachable_database,
)
from mlflow_tg.tracking.quiet import quiet
from mlflow_tg.tracking.records import (
    EMBEDDED_URI,
    RunNotFoundError,
    RunRecord,
    StoreError,
    Unsupported,
    Version,
)
from mlflow_tg.tracking.sqlite import missing_store


def parser() -> argparse.ArgumentParser:
    """The command line."""
    cli = argparse.ArgumentParser(
        prog="mlflow-tg",
        description="mlflow_tg's command line: predict a run's final test accuracy (predict), "
        "serve the predictor (serve), end the runs of processes that died (reap, replay).",
    )
    commands = cli.add_subparsers(dest="command", required=True)
    predict = commands.add_parser(
        "predict",
        help="predict a run's final test accuracy from its first epochs and log it to the run",
    )
    predict.add_argument("--run-id", required=True, help="an mlflow_tg training run")
    predict.add_argument(
        "--endpoint",
        help="URL of `mlflow models serve` (e.g. http://127.0.0.1:5001); default: load the "
        "registered model in this process",
    )
    predict.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or EMBEDDED_URI,
        help="where the run and the registry are (default: $MLFLOW_TRACKING_URI or the "
        "embedded store, sqlite:///mlflow.db)",
    )
    predict.add_argument(
        "--model",
        help=f"registered model (default: {keys.REGISTERED_MODEL}; with --endpoint, the served "
        "model answers)",
    )
    predict.add_argument(
        "--alias", help=f"its version to use (default: {keys.CHAMPION}; not with --endpoint)"
    )
    predict.add_argument(
        "--verbose",
        action="store_true",
        help="go through MLflow's client and show its logs, warnings and progress bars, and "
        "its check of the version's pip requirements (slower)",
    )
    serve = commands.add_parser(
        "serve",
        help="serve a registered version with `mlflow models serve`, once it is checked to be "
        "there",
        description="Check that the registry holds the version, then serve it with MLflow's "
        "scoring server (mlflow models serve -m models:/NAME/N --env-manager local); ask it "
        "with mlflow-tg predict --endpoint URL.",
    )
    serve.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or EMBEDDED_URI,
        help="where the registry is (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    serve.add_argument(
        "--model", default=keys.REGISTERED_MODEL, help="registered model (default: %(default)s)"
    )
    serve.add_argument(
        "--alias", default=keys.CHAMPION, help="its version to serve (default: %(default)s)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    serve.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    add_tracking_commands(commands)  # reap, replay
    return cli


def window_rows(run: RunRecord, version: Version) -> list[dict]:
    """The run's history up to the version's largest window: later epochs are not sent."""
    ks = version.tags.get(keys.KS_TAG)
    last = max(int(k) for k in ks.split(",")) if ks else None
    return [row for row in run.history if last is None or row[keys.EPOCH] <= last]


def answer_for(args: argparse.Namespace, store: Store) -> tuple[RunRecord, dict[str, Any], str]:
    """The run, the predictor's answer for it (or the known one) and where it came from.

    Nothing is logged yet: Unsupported here, where ``store`` meets what it does not handle,
    leaves the store as it was.
    """
    run = store.record(args.run_id)
    answer = known_answer(run.run_id, run.tags, run.metrics, run.history)
    if answer is not None:
        return run, answer, KNOWN
    if args.endpoint:
        return run, *ask_served(args, run)
    version = store.version(args.model, args.alias)
    return run, answer_here(store, version, run, window_rows(run, version)), f"{version} in process"


def ask_served(args: argparse.Namespace, run: RunRecord) -> tuple[dict, str]:
    """The endpoint's answer, and what answered.

    The whole history goes: the served model reads its own windows, and the registered
    version that ``--model``/``--alias`` name in the store need not be the one it serves.
    """
    from mlflow_tg.predictor.endpoint import post_request
    from mlflow_tg.serve.rest import history_request

    request = history_request(run.history, run.params, run.run_id)
    (answer,) = post_request(args.endpoint, request)
    return answer, f"the model served at {args.endpoint}"


def check_addresses(args: argparse.Namespace) -> None:
    """StoreError or EndpointError, at once, for an address that cannot be right.

    The store (``check_store``), and an endpoint that is not an ``http(s)://`` URL.
    """
    check_store(args.tracking_uri)
    if args.endpoint and not args.endpoint.startswith(("http://", "https://")):
        raise EndpointError(
            f"--endpoint {args.endpoint!r} is not a URL: give its scheme, for example "
            f"http://{args.endpoint.removeprefix('//')} (the address `make serve` prints)."
        )


def check_store(uri: str) -> None:
    """StoreError, at once, for a tracking URI that cannot be right.

    A tracking server that does not answer ``/health`` within seconds (MLflow's client would
    retry it for minutes), a ``sqlite:///`` file that does not exist (MLflow would create an
    empty store there).
    """
    if uri.startswith(("http://", "https://")):
        why = unanswered(uri)
        if why is not None:
            raise StoreError(
                f"--tracking-uri {uri}: no MLflow tracking server answers there ({why}). Start "
                "it (make server-start), or point --tracking-uri (or MLFLOW_TRACKING_URI) at a "
                "running one."
            )
    elif (why := unreachable_database(uri)) is not None:
        raise StoreError(database_refused(uri, why, "--tracking-uri "))
    elif (missing := missing_store(uri)) is not None:
        raise StoreError(
            f"--tracking-uri {uri}: no tracking store there ({missing} does not exist). "
            "train.py logs to sqlite:///mlflow.db in the folder it runs in: run the command "
            "there, or give that file's URI (sqlite:////absolute/path/mlflow.db)."
        )


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """Fetch the run, ask the predictor, log and print the answer.

    Through the store of the tracking URI, or MLflow's client where that store gives way.
    """
    check_addresses(args)
    if args.endpoint and (args.model or args.alias):
        print("mlflow-tg: --model and --alias are not used with --endpoint: the model served "
              "there answers", file=sys.stderr)  # fmt: skip
    args.model, args.alias = args.model or keys.REGISTERED_MODEL, args.alias or keys.CHAMPION
    store = open_store(args.tracking_uri, args.endpoint, args.verbose)
    try:
        run, answer, source = answer_for(args, store)
    except Unsupported:
        store = MlflowStore(args.tracking_uri, args.verbose)
        run, answer, source = answer_for(args, store)
    tags = {keys.PREDICTED_BY: source, keys.NOTE: with_note(run.tags.get(keys.NOTE), answer)}
    store.log(run.run_id, predicted_metrics(answer), int(answer[keys.ANSWER_K]), tags)
    print(describe(run.run_id, answer, source))
    return answer


def serve(args: argparse.Namespace, environment: dict[str, str]) -> NoReturn:
    """Check that the store has the version, then become MLflow's scoring server for it.

    ``mlflow models serve`` on a store without it prints MLflow's traceback. The process is
    replaced (exec): signals, output and exit code are the server's own. The version the alias
    names now is served, and stays served if the alias moves: serve again to follow it.
    """
    check_store(args.tracking_uri)
    try:
        version = open_store(args.tracking_uri, None, False).version(args.model, args.alias)
    except Unsupported:
        version = MlflowStore(args.tracking_uri).version(args.model, args.alias)
    address = f"http://{args.host}:{args.port}"
    print(
        f"mlflow-tg: serving {version} ({args.model}@{args.alias}) at {address}; ask it with "
        f"mlflow-tg predict --endpoint {address} --run-id RUN",
        flush=True,
    )
    bin_folder = os.path.dirname(sys.executable)  # MLflow execs uvicorn from PATH: this one's
    environment = environment | {  # as it came, not as this command quieted MLflow for itself
        "MLFLOW_TRACKING_URI": args.tracking_uri,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PATH": f"{bin_folder}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(version),
               "--env-manager", "local", "-h", args.host, "-p", str(args.port)]  # fmt: skip
    os.execve(sys.executable, command, environment)


# what the command reports in one paragraph (exit 2): bad input, or what a store lacks
REPORTED = (RunNotFoundError, RegistryError, StoreError, Refusal, EndpointError,
            TrackingServerError)  # fmt: skip


def refusal_message(error: Exception) -> str | None:
    """The one paragraph for an error that means bad input or a missing run; None for others."""
    if isinstance(error, REPORTED):
        return str(error)
    if (refused := refused_access(error)) is not None:
        return refused
    mlflow_errors = sys.modules.get("mlflow.exceptions")  # raised only where MLflow was loaded
    if mlflow_errors and isinstance(error, mlflow_errors.MlflowException):
        return error.message
    return None


def main(argv: list[str] | None = None) -> None:
    """Console script entry point; bad input exits 2 with one paragraph."""
    args = parser().parse_args(argv)
    if args.command in TRACKING_COMMANDS:
        sys.exit(run_tracking_command(args))
    environment = dict(os.environ)
    quiet(getattr(args, "verbose", False))
    try:
        if args.command == "serve":
            serve(args, environment)
        predict(args)
    except Exception as error:
        message = refusal_message(error)
        if message is None:
            raise
        print(f"mlflow-tg: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
