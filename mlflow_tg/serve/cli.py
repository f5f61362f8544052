"""``mlflow-tg predict --run-id RUN [--endpoint URL]``: predicted final accuracy of a run."""

from __future__ import annotations

import argparse
import os
import sys

import mlflow
from mlflow import MlflowClient

from mlflow_tg import keys
from mlflow_tg.predictor.features import NotEnoughEpochsError, run_features
from mlflow_tg.predictor.registry import FeatureSpec, RegistryError, version_by_alias
from mlflow_tg.predictor.scoring import model_columns, model_row, predict_in_process
from mlflow_tg.serve.client import EndpointError, ask_endpoint
from mlflow_tg.tracking.runs import RunNotFoundError, load_run

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
    return cli


def predict(args: argparse.Namespace) -> float:
    """Build the run's features, ask the predictor, log and return its answer."""
    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient()
    version = version_by_alias(client, args.model, args.alias)
    if version is None:
        raise RunNotFoundError(
            f"the registry of {args.tracking_uri} has no model {args.model!r} with alias "
            f"{args.alias!r}; fit one first: python -m mlflow_tg.predictor"
        )
    spec = FeatureSpec.of_version(version)
    run = load_run(client, args.run_id)
    features = run_features(run.history, run.params, spec.k, spec.sets, args.run_id)
    model_uri = f"models:/{args.model}/{version.version}"
    if args.endpoint:  # only the columns the model reads: a smaller request, a faster answer
        prediction = ask_endpoint(args.endpoint, model_row(features, model_columns(model_uri)))
        source = f"{model_uri} via {args.endpoint}"
    else:
        prediction = predict_in_process(model_uri, features)
        source = f"{model_uri} in process"
    client.log_metric(args.run_id, keys.PREDICTED, prediction, step=spec.k)
    client.set_tag(args.run_id, keys.PREDICTED_BY, source)
    print(
        f"run {args.run_id}: predicted final test accuracy {prediction:.4f} "
        f"(from epochs 0..{spec.k}, {source}; logged as {keys.PREDICTED})"
    )
    return prediction


def main(argv: list[str] | None = None) -> None:
    """Console script entry point; bad input exits 2 with one paragraph."""
    args = parser().parse_args(argv)
    try:
        predict(args)
    except (RunNotFoundError, NotEnoughEpochsError, EndpointError, RegistryError) as error:
        print(f"mlflow-tg: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
