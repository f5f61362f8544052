"""A small store for the latency benches: 12 tiny runs and a predictor registered on them.

    store = small_store.make_store(DEFAULT_STORE)   # reused when it is already there

``python train.py -m model=mlp width=2 epochs=3 optimizer.lr=… seed=0,1`` (default graph
capture, no node tables), then ``python -m mlflow_tg.predictor`` with k=2 and ks=[1,2,3] on
graph+curve+hparams (the set that reads the most columns: the slowest request),
CatBoost as conf/predictor.yaml (600 trees of depth 6: a registered model of the real size).
The job needs 8 runs and 3 held out at least, so not a single run.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tg-performance-predictor"
LEARNING_RATES = "0.003,0.01,0.03,0.1,0.3,1.0"
DEFAULT_STORE = Path(tempfile.gettempdir()) / "mlflow_tg-bench-store"


def make_store(folder: Path) -> dict[str, str]:
    """The store's tracking URI, a run id of it and its champion's URI (made if missing)."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracking = [f"tracking.uri={uri}", f"tracking.artifact_root={folder / 'artifacts'}"]
    client = MlflowClient(uri)
    if client.get_experiment_by_name("population") is None:
        subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "-m", "model=mlp", "width=2", "epochs=3",
             f"optimizer.lr={LEARNING_RATES}", "seed=0,1", "device=cpu", "graph.node_tables=false",
             "tracking.experiment=population", f"hydra.sweep.dir={folder / 'multirun'}",
             "hydra/job_logging=disabled", *tracking],
            cwd=folder, check=True, capture_output=True,
        )  # fmt: skip
    if not client.search_registered_models(f"name = '{MODEL}'"):
        subprocess.run(
            [sys.executable, "-m", "mlflow_tg.predictor", "k=2", "ks=[1,2,3]",
             "feature_sets=graph+curve+hparams", "compare_sets=[graph+curve+hparams]",
             "holdout_fraction=0.4", f"hydra.run.dir={folder / 'out'}", *tracking],
            cwd=folder, check=True, capture_output=True,
        )  # fmt: skip
    experiment = client.get_experiment_by_name("population").experiment_id
    run = client.search_runs([experiment], "attributes.status = 'FINISHED'", max_results=1)[0]
    return {"uri": uri, "run_id": run.info.run_id, "model": f"models:/{MODEL}@champion"}
