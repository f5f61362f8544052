"""``mlflow-tg predict --run-id RUN [--endpoint URL]``: predicted final accuracy of a run.

A thin client of the registered model, which takes runs: it fetches the run's history and
params, sends them (to the endpoint, or to the version loaded in this process), logs the answer
to the run (``predicted/test_acc``, its interval and the out-of-distribution flag, at step = the
window used) and prints it. A finished run tagged ``diverged`` needs no prediction: its final
accuracy is known, and that is the answer.

Fast and quiet: nothing heavy is imported before the arguments are read, nothing on the path
imports torch, and MLflow's logs and progress bars stay off unless ``--verbose``. With a
tracking server (``http(s)://``) and an endpoint, it is plain HTTP (``rest.py``): no MLflow
client, no pandas.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from typing import Any

from mlflow_tg import keys
from mlflow_tg.predictor.describe import with_note
from mlflow_tg.serve.answer import KNOWN, describe, known_answer, predicted_metrics
from mlflow_tg.tracking.commands import COMMANDS as TRACKING_COMMANDS
from mlflow_tg.tracking.commands import add_commands as add_tracking_commands
from mlflow_tg.tracking.commands import run_command as run_tracking_command

# The embedded store of conf/tracking/local.yaml, where train.py logs by default.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def parser() -> argparse.ArgumentParser:
    """The command line."""
    cli = argparse.ArgumentParser(prog="mlflow-tg", description=__doc__.splitlines()[0])
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
        default=os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
        help="where the run and the registry are (default: $MLFLOW_TRACKING_URI or the "
        "embedded store, sqlite:///mlflow.db)",
    )
    predict.add_argument("--model", default=keys.REGISTERED_MODEL, help="registered model")
    predict.add_argument("--alias", default=keys.CHAMPION, help="its version to use")
    predict.add_argument(
        "--verbose", action="store_true", help="show MLflow's logs, warnings and progress bars"
    )
    add_tracking_commands(commands)  # reap, replay
    return cli


def quiet(verbose: bool) -> None:
    """MLflow's progress bars, logs and warnings off, unless ``verbose``."""
    if verbose:
        return
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def ask(args: argparse.Namespace, client: Any, run: Any) -> tuple[dict[str, Any], str]:
    """The registered version's answer for ``run``, and where it came from."""
    from mlflow_tg.predictor.model import model_input
    from mlflow_tg.predictor.registry import version_by_alias
    from mlflow_tg.tracking.runs import RunNotFoundError

    version = version_by_alias(client, args.model, args.alias)
    if version is None:
        raise RunNotFoundError(
            f"the registry of {args.tracking_uri} has no model {args.model!r} with alias "
            f"{args.alias!r}; fit one first: python -m mlflow_tg.predictor"
        )
    model_uri = f"models:/{args.model}/{version.version}"
    ks = version.tags.get(keys.KS_TAG)  # its windows: epochs after the largest are not sent
    last = max(int(k) for k in ks.split(",")) if ks else None
    rows = [row for row in run.history if last is None or row[keys.EPOCH] <= last]
    frame = model_input(rows, run.params, run.run_id)
    if args.endpoint:
        from mlflow_tg.serve.client import ask_endpoint

        (answer,) = ask_endpoint(args.endpoint, frame).to_dict("records")
        return answer, f"{model_uri} via {args.endpoint}"
    from mlflow_tg.predictor.scoring import input_columns, load_run_predictor

    model = load_run_predictor(model_uri, check_requirements=args.verbose)
    declared = set(input_columns(model))  # the other metrics of the history are not read
    (answer,) = model.predict(frame[[c for c in frame if c in declared]]).to_dict("records")
    return answer, f"{model_uri} in process"


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """Fetch the run, ask the predictor (unless the answer is known), log and print the answer."""
    if args.endpoint and args.tracking_uri.startswith(("http://", "https://")):
        return predict_over_http(args)
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from mlflow_tg.tracking.runs import load_run

    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient()
    run = load_run(client, args.run_id)
    answer = known_answer(run.run_id, run.tags, run.metrics, run.history)
    if answer is not None:
        source = KNOWN
    else:
        answer, source = ask(args, client, run)
    now, step = int(time.time() * 1000), int(answer[keys.ANSWER_K])
    client.log_batch(
        args.run_id,
        metrics=[Metric(k, v, now, step) for k, v in predicted_metrics(answer).items()],
        tags=[
            RunTag(keys.PREDICTED_BY, source),
            RunTag(keys.NOTE, with_note(run.tags.get(keys.NOTE), answer)),
        ],
    )
    print(describe(args.run_id, answer, source))
    return answer


def predict_over_http(args: argparse.Namespace) -> dict[str, Any]:
    """``predict`` with a tracking server and an endpoint: plain HTTP, no MLflow client."""
    from mlflow_tg.serve.client import post_request
    from mlflow_tg.serve.rest import Server, request_body

    server = Server(args.tracking_uri)
    run = server.run(args.run_id)
    data = run["data"]
    tags = {tag["key"]: tag["value"] for tag in data.get("tags", [])}
    metrics = {metric["key"]: metric["value"] for metric in data.get("metrics", [])}
    params = {param["key"]: param["value"] for param in data.get("params", [])}
    history = server.history(args.run_id)
    answer = known_answer(args.run_id, tags, metrics, history)
    if answer is not None:
        source = KNOWN
    else:
        version = server.version(args.model, args.alias)
        windows = {tag["key"]: tag["value"] for tag in version.get("tags", [])}.get(keys.KS_TAG)
        last = max(int(k) for k in windows.split(",")) if windows else None
        rows = [row for row in history if last is None or row[keys.EPOCH] <= last]
        (answer,) = post_request(args.endpoint, request_body(rows, params, args.run_id))
        source = f"models:/{args.model}/{version['version']} via {args.endpoint}"
    step = int(answer[keys.ANSWER_K])
    tags = {keys.PREDICTED_BY: source, keys.NOTE: with_note(tags.get(keys.NOTE), answer)}
    server.log(args.run_id, predicted_metrics(answer), step, tags)
    print(describe(args.run_id, answer, source))
    return answer


def main(argv: list[str] | None = None) -> None:
    """Console script entry point; bad input exits 2 with one paragraph."""
    args = parser().parse_args(argv)
    if args.command in TRACKING_COMMANDS:
        sys.exit(run_tracking_command(args))
    quiet(args.verbose)
    from mlflow_tg.serve.client import EndpointError

    if args.endpoint and args.tracking_uri.startswith(("http://", "https://")):
        from mlflow_tg.serve.rest import TrackingServerError

        try:
            predict(args)
        except (TrackingServerError, EndpointError) as error:
            print(f"mlflow-tg: {error}", file=sys.stderr)
            sys.exit(2)
        return
    from mlflow.exceptions import MlflowException

    from mlflow_tg.predictor.registry import RegistryError
    from mlflow_tg.tracking.runs import RunNotFoundError

    try:
        predict(args)
    except (RunNotFoundError, EndpointError, RegistryError) as error:
        print(f"mlflow-tg: {error}", file=sys.stderr)
        sys.exit(2)
    except MlflowException as error:  # the model's refusal: what the run lacks
        print(f"mlflow-tg: {error.message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
