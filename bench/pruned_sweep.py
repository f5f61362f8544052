"""A real sweep pruned live, next to the same sweep unpruned: compute saved, best run found.

    python bench/pruned_sweep.py [--tracking-uri sqlite:///mlflow.db]     (or: make pruned-sweep)

Needs a registered champion in the store (``make population predictor``). Runs the sweep of
``conf/experiment/sweep.yaml`` twice on both cores (joblib launcher): with
``prune=predicted predict=champion`` into the experiment ``sweep-pruned``, then unpruned into
``sweep-full``, and prints for each the wall time, the epochs trained and the best final test
accuracy among the jobs that trained their whole budget.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from mlflow_tg import keys

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(experiment: str, extra: list[str], tracking_uri: str) -> float:
    """Launch the sweep; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "train.py", "-m", "+experiment=sweep", f"tracking.experiment={experiment}",
         f"tracking.uri={tracking_uri}", "hydra/job_logging=disabled", *extra],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - start


def summary(client: MlflowClient, experiment: str) -> dict[str, float]:
    """Jobs, epochs trained, pruned jobs and the best completed job of one sweep."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=10_000)
    epochs = [len(client.get_metric_history(r.info.run_id, keys.VAL_ACC)) - 1 for r in runs]
    completed = [r for r in runs if r.data.tags.get(keys.PRUNED) != "true"]
    best = max(completed, key=lambda r: r.data.metrics.get(keys.TARGET, 0.0))
    return {
        "jobs": len(runs),
        "epochs": sum(epochs),
        "pruned": len(runs) - len(completed),
        "best": best.data.metrics[keys.TARGET],
        "best_run": best.info.run_name,
    }


def main() -> None:
    """Both sweeps, then the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    client = MlflowClient(args.tracking_uri)
    try:
        client.get_model_version_by_alias(keys.REGISTERED_MODEL, keys.CHAMPION)
    except Exception as error:
        sys.exit(f"no {keys.REGISTERED_MODEL}@{keys.CHAMPION} in {args.tracking_uri} ({error}); "
                 "make one first: make population predictor")  # fmt: skip
    timings = {
        "sweep-pruned": run_sweep(
            "sweep-pruned", ["prune=predicted", "predict=champion"], args.tracking_uri
        ),
        "sweep-full": run_sweep("sweep-full", [], args.tracking_uri),
    }
    results = {name: summary(client, name) for name in timings}
    full = results["sweep-full"]
    for name, result in results.items():
        print(
            f"{name:13s} {result['jobs']} jobs, {timings[name]:6.0f} s, {result['epochs']} epochs "
            f"({result['epochs'] / full['epochs']:.0%} of unpruned), {result['pruned']} pruned, "
            f"best test_acc {result['best']:.4f} ({result['best_run']})"
        )
    saved = 1 - timings["sweep-pruned"] / timings["sweep-full"]
    regret = 100 * (results["sweep-pruned"]["best"] - full["best"])
    print(f"wall time saved {saved:.0%}; best found differs by {regret:+.2f} points")


if __name__ == "__main__":
    main()
