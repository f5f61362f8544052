"""Served predictor latency on loopback beside a column-based endpoint; registration time.

    python bench/serving.py [--store DIR] [--requests 200]

On the small store of ``small_store.py`` (made in DIR, default
``$TMPDIR/mlflow_tg-bench-store``, or reused):

- ``runs``: ``mlflow models serve`` of the champion (a ``RunPredictor``); requests of one run (its
  epochs 0..3: the columns the signature declares, or the whole history as ``mlflow-tg predict``
  sends it) and of 100 runs (copies of the store's runs under 100 run ids);
- ``columns``: the former kind, a bare CatBoost regressor on 32 float columns (600 trees of
  depth 6, as conf/predictor.yaml) logged with ``mlflow.catboost``, served the same way; one row
  and 100 rows;
- the same pyfunc models called in this process;
- logging and registering a version of the champion's model (``log_and_register``), 3 times.

Requests go over one keep-alive session after 20 warm-up requests; bodies are built beforehand.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import requests
from catboost import CatBoostRegressor
from cli_latency import serve, stop
from mlflow import MlflowClient
from mlflow.models import infer_signature
from small_store import DEFAULT_STORE, make_store

from mlflow_tg.predictor.answering import model_input
from mlflow_tg.predictor.endpoint import request_body
from mlflow_tg.predictor.registry import FeatureSpec, log_and_register
from mlflow_tg.tracking.runs import load_runs

LAST_EPOCH = 3


def column_based_model(uri: str) -> str:
    """Register the former kind of version: CatBoost on 32 float columns; its model URI."""
    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.normal(size=(400, 32)), columns=[f"f{i}" for i in range(32)])
    y = x["f0"] - 0.5 * x["f1"] + 0.1 * rng.normal(size=400)
    model = CatBoostRegressor(
        iterations=600, depth=6, learning_rate=0.05, verbose=False, allow_writing_files=False
    ).fit(x, y)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-serving")
    with mlflow.start_run(run_name="column-based"):
        info = mlflow.catboost.log_model(
            model, name="model", signature=infer_signature(x, model.predict(x)),
            input_example=x.head(1), pip_requirements=["catboost"],
        )  # fmt: skip
    version = mlflow.register_model(info.model_uri, "bench-column-based")
    return f"models:/bench-column-based/{version.version}"


def run_requests(uri: str, declared: list[str]) -> dict[str, pd.DataFrame]:
    """Request frames: one run (declared columns; whole history), and 100 runs."""
    runs = [r for r in load_runs(MlflowClient(uri), "population") if r.history]
    frames = [
        model_input([row for row in r.history if row["epoch"] <= LAST_EPOCH], r.params, r.run_id)
        for r in runs
    ]
    many = [
        frames[i % len(frames)].assign(run_id=f"run-{i:03d}") for i in range(100)
    ]  # 100 distinct runs
    keep = [c for c in frames[0] if c in set(declared)]
    return {
        "1 run, declared columns": frames[0][keep],
        "1 run, whole history": frames[0],
        "100 runs, declared columns": pd.concat(many, ignore_index=True)[keep],
    }


def latency(url: str, body: str, count: int) -> tuple[float, float]:
    """Median and 99th percentile of ``count`` requests, in ms, after 20 warm-up ones."""
    session = requests.Session()
    headers = {"Content-Type": "application/json"}
    times = []
    for i in range(20 + count):
        start = time.perf_counter()
        response = session.post(f"{url}/invocations", data=body, headers=headers, timeout=60)
        elapsed = time.perf_counter() - start
        assert response.status_code == 200, response.text[-1000:]
        if i >= 20:
            times.append(1000 * elapsed)
    return statistics.median(times), float(np.percentile(times, 99))


def in_process(model, frame: pd.DataFrame, count: int) -> tuple[float, float]:
    """Median and p99 of ``count`` in-process predictions, in ms."""
    times = []
    for i in range(10 + count):
        start = time.perf_counter()
        model.predict(frame)
        if i >= 10:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), float(np.percentile(times, 99))


def registration_times(uri: str, champion: str, example: pd.DataFrame) -> list[float]:
    """Seconds to log and register a version of the champion's model, 3 times."""
    mlflow.set_tracking_uri(uri)
    predictor = mlflow.pyfunc.load_model(champion).unwrap_python_model()
    mlflow.set_experiment("bench-serving")
    seconds = []
    for _ in range(3):
        with mlflow.start_run(run_name="registration"):
            start = time.perf_counter()
            spec = FeatureSpec(2, "graph+curve+hparams", None, tuple(predictor.ks))
            log_and_register(predictor, example, "bench-registration", spec)
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    """Serve both kinds, time them, time registration, print one table."""
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--store", type=Path, default=DEFAULT_STORE)
    cli.add_argument("--requests", type=int, default=200)
    cli.add_argument("--ports", type=int, nargs=2, default=[5197, 5198])
    args = cli.parse_args()
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logging.getLogger("mlflow").setLevel(logging.ERROR)  # "extra inputs ignored", per request
    store = make_store(args.store)
    mlflow.set_tracking_uri(store["uri"])
    runs_model = mlflow.pyfunc.load_model(store["model"])
    frames = run_requests(store["uri"], runs_model.metadata.signature.inputs.input_names())
    columns_uri = column_based_model(store["uri"])
    columns_model = mlflow.pyfunc.load_model(columns_uri)
    rows = pd.DataFrame(np.random.default_rng(1).normal(size=(100, 32)),
                        columns=[f"f{i}" for i in range(32)])  # fmt: skip
    column_frames = {"1 row, 32 columns": rows.head(1), "100 rows, 32 columns": rows}
    registered = registration_times(store["uri"], store["model"], frames["1 run, whole history"])
    servers = [serve(store["model"], store["uri"], args.ports[0]),
               serve(columns_uri, store["uri"], args.ports[1])]  # fmt: skip
    table = []
    try:
        for (kind, port, model), requests_ in zip(
            [("runs", args.ports[0], runs_model), ("columns", args.ports[1], columns_model)],
            [frames, column_frames],
            strict=True,
        ):
            for name, frame in requests_.items():
                count = args.requests if frame.shape[0] <= 13 else args.requests // 4
                served = latency(f"http://127.0.0.1:{port}", request_body(frame), count)
                local = in_process(model, frame, count)
                table.append((kind, name, *served, *local))
    finally:
        for server in servers:
            stop(server)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; python {sys.version}")
    print(f"{'endpoint':8} {'request':28} {'served median':>14} {'p99':>8} "
          f"{'in-process median':>18} {'p99':>8}")  # fmt: skip
    for kind, name, median, p99, local_median, local_p99 in table:
        print(f"{kind:8} {name:28} {median:11.1f} ms {p99:5.1f} ms "
              f"{local_median:15.1f} ms {local_p99:5.1f} ms")  # fmt: skip
    print("log and register a version: " + ", ".join(f"{s:.1f} s" for s in registered))


if __name__ == "__main__":
    main()
