"""What live prediction costs a training epoch: the hook's call, next to the epoch it follows.

    python bench/live_prediction.py [--tracking-uri sqlite:///mlflow.db] [--experiment offgrid]
        [--model tg-performance-predictor] [--alias champion]

Replays, for a few finished runs, the call ``predict=champion`` makes after each epoch (the
run's history so far through ``model_input`` to the champion loaded in this process), times
each call, and prints the median next to the median epoch time those runs logged
(``epoch_time_s``, graph capture excluded) and the ratio of the two.
"""

from __future__ import annotations

import argparse
import logging
import time

import mlflow
import numpy as np
from mlflow import MlflowClient
from omegaconf import OmegaConf

from mlflow_tg import keys
from mlflow_tg.predictor.live import LivePrediction
from mlflow_tg.tracking.runs import load_runs
from mlflow_tg.train.hooks import Epoch


class NoRun:
    """Stands in for the run a live job logs to: the bench logs nothing."""

    run_id = "bench"

    def describe(self, line: str) -> None:
        """Nothing to describe."""


def main() -> None:
    """Time the hook on every epoch of a few runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="offgrid")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--model", default=keys.REGISTERED_MODEL)
    parser.add_argument("--alias", default=keys.CHAMPION)
    args = parser.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    records = [r for r in load_runs(MlflowClient(), args.experiment) if r.history][: args.runs]
    cfg = OmegaConf.create({"model": args.model, "alias": args.alias, "endpoint": None})
    calls, epochs = [], []
    for record in records:
        hook = LivePrediction(cfg, record.params)
        history = sorted(record.history, key=lambda row: row["epoch"])
        for row in history:
            metrics = {k: v for k, v in row.items() if k != "epoch"}
            epoch = Epoch(int(row["epoch"]), model=None, metrics=metrics, history=[
                r for r in history if r["epoch"] < row["epoch"]
            ])  # fmt: skip
            start = time.perf_counter()
            hook.on_epoch(epoch, NoRun())
            if epoch.number >= 1 and keys.PREDICTED in epoch.metrics:
                calls.append(time.perf_counter() - start)
                epochs.append(row.get(keys.EPOCH_TIME, np.nan))
    call, epoch_time = float(np.median(calls)), float(np.nanmedian(epochs))
    print(f"{len(calls)} live predictions over {len(records)} runs of {args.experiment!r}")
    print(f"hook call: median {1000 * call:.1f} ms; the epochs it followed: median "
          f"{epoch_time:.2f} s; cost {call / epoch_time:.1%} of an epoch")  # fmt: skip


if __name__ == "__main__":
    main()
