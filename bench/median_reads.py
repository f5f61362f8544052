"""Store reads of one ``prune=median`` job among finished sweep-mates, cached against not.

    python bench/median_reads.py [--mates 300] [--epochs 10]

Logs ``--mates`` finished runs of one sweep in a throwaway SQLite store, then trains one real
job (``model=mlp graph=off prune=median``) against them twice: as shipped, where a mate's
``val_acc`` history is read again only while it can still change, and with every history read
afresh at every epoch. Prints the history reads and the job's wall time for each, side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from mlflow_tg import keys
from mlflow_tg.config import compose_config
from mlflow_tg.job import train
from mlflow_tg.prune import hook


class Uncached(hook.MateCurves):
    """Every mate's history read again at every epoch."""

    def through(self, client: MlflowClient, mate: Run, epoch: int) -> dict[int, float]:
        """The mate's whole history, read now."""
        history = client.get_metric_history(mate.info.run_id, keys.VAL_ACC)
        return {point.step: point.value for point in history}


def log_mates(count: int, epochs: int) -> None:
    """Finished mates below any learning job, so the measured job trains its whole budget."""
    mlflow.set_experiment("bench")
    for _ in range(count):
        with mlflow.start_run(tags={keys.SWEEP: "bench", keys.PRUNED: "false"}):
            for epoch in range(epochs + 1):
                mlflow.log_metric(keys.VAL_ACC, 0.0, step=epoch)
            mlflow.log_metric(keys.TARGET, 0.0, step=epochs)


def measure(folder: Path, epochs: int) -> tuple[int, int, float]:
    """History reads, epochs trained and seconds of one job."""
    reads = 0
    read = MlflowClient.get_metric_history

    def counted(self: MlflowClient, *args, **kwargs):
        nonlocal reads
        reads += 1
        return read(self, *args, **kwargs)

    MlflowClient.get_metric_history = counted
    try:
        cfg = compose_config(
            [f"epochs={epochs}", "width=2", "device=cpu", "model=mlp", "graph=off",
             "prune=median", "prune.sweep=bench", f"tracking.uri={mlflow.get_tracking_uri()}",
             f"tracking.artifact_root={folder / 'artifacts'}", "tracking.experiment=bench"]
        )  # fmt: skip
        start = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - start
        MlflowClient().delete_run(result["run_id"])  # not a mate of the next measurement
        return reads, result["epochs_completed"], seconds
    finally:
        MlflowClient.get_metric_history = read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mates", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
        log_mates(args.mates, args.epochs)
        print(f"one median-pruned job, {args.mates} finished mates, {args.epochs} epochs")
        print(f"{'mates read':<26} {'history reads':>13} {'epochs':>6} {'seconds':>8}")
        cached = hook.MateCurves
        for label, curves in (("again only while running", cached), ("at every epoch", Uncached)):
            hook.MateCurves = curves
            try:
                reads, trained, seconds = measure(folder, args.epochs)
            finally:
                hook.MateCurves = cached
            print(f"{label:<26} {reads:>13} {trained:>6} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
