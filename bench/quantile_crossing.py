"""How often a registered version's quantile fits cross, on the runs of some experiments.

    python bench/quantile_crossing.py [--tracking-uri sqlite:///mlflow.db]
        [--experiments offgrid ...] [--model tg-performance-predictor] [--versions 1 ...]

The registered model answers the middle of its three quantiles once sorted. For each version it
prints, over the runs that have its largest window's epochs: how many runs' raw quantiles (the
averaged fits' 0.1, 0.5 and 0.9 before sorting) cross, how many with the median above the 0.9
quantile and below the 0.1 quantile, and the median size of a crossing.
"""

from __future__ import annotations

import argparse
import logging

import mlflow
import numpy as np
from mlflow import MlflowClient

from mlflow_tg import keys
from mlflow_tg.predictor.features import run_features
from mlflow_tg.tracking.runs import load_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiments", nargs="+", default=["offgrid"])
    parser.add_argument("--model", default=keys.REGISTERED_MODEL)
    parser.add_argument("--versions", nargs="+", default=["1"])
    args = parser.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    runs = [run for name in args.experiments for run in load_runs(MlflowClient(), name)]
    for version in args.versions:
        predictor = mlflow.pyfunc.load_model(f"models:/{args.model}/{version}")
        answerer = predictor.unwrap_python_model()
        k = answerer.ks[-1]
        window, model = answerer.windows[k], answerer._models[k]
        rows = []
        for run in runs:
            history = [row for row in run.history or [] if row[keys.EPOCH] <= k]
            if len(history) == k + 1:
                features = run_features(history, run.params, k, window.sets, run.run_id)
                rows.append([features[column] for column in window.columns])
        low, median, high = model.predict(np.array(rows, dtype=object)).T
        above, below = median > high, median < low
        crossed = above | below
        size = np.maximum(median - high, low - median)[crossed]
        print(f"version {version} (k={k}): {int(crossed.sum())} of {len(rows)} runs crossed "
              f"({crossed.mean():.0%}); median above the 0.9 quantile {int(above.sum())}, below "
              f"the 0.1 quantile {int(below.sum())}; median crossing "
              f"{np.median(size) if len(size) else 0:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
