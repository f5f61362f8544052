"""Width transfer with each summary's power law in width divided out (tried, and rejected).

    python bench/width_detrend.py [OVERRIDES] [--tracking-uri sqlite:///mlflow.db]
        [--experiment population] [--k 3]

OVERRIDES: ``conf/predictor.yaml`` settings, such as ``ensemble=1`` (one fit, not the average).

A summary whose level grows like ``width^α`` tells a tree fitted on narrow networks nothing it
can use on wide ones. Here each column's α is fitted on the narrow half of the widths only: the
median of ``|column|`` per (model family, width), regressed in log-log within each family. Every
row is then divided by its ``width^α``, and the model fitted on the narrow half scores the wide
half. Four column sets, each fitted once on the same rows: curve+hparams; with the graph as
logged; with the graph detrended; with the graph and the curves detrended. Prints Kendall τ on
the wide runs and each gain over curve+hparams with its 95% bootstrap interval over
configurations.
"""

from __future__ import annotations

import argparse

import mlflow
import numpy as np
import polars as pl
from mlflow import MlflowClient
from predictor_quality import graph_gain
from scipy import stats

from mlflow_tg.config import compose_config
from mlflow_tg.keys import TARGET
from mlflow_tg.predictor.dataset import Dataset, build_dataset
from mlflow_tg.predictor.evaluate import narrow_half
from mlflow_tg.predictor.features import columns_of
from mlflow_tg.predictor.fit import fit_and_score
from mlflow_tg.tracking.runs import load_runs


def width_exponent(frame: pl.DataFrame, column: str) -> float:
    """α of ``median |column| ∝ width^α``, fitted within each model family (0 when unfit)."""
    medians = (
        frame.group_by("model", "run_width")
        .agg(pl.col(column).abs().median().alias("level"))
        .filter(pl.col("level") > 0)
    )
    xs, ys = [], []
    for _, family in medians.group_by("model"):
        if family.height >= 2:
            log_width, log_level = np.log(family["run_width"]), np.log(family["level"])
            xs.append(log_width - log_width.mean())
            ys.append(log_level - log_level.mean())
    if not xs:
        return 0.0
    x, y = np.concatenate(xs), np.concatenate(ys)
    return float(x @ y / (x @ x)) if x @ x > 0 else 0.0


def detrended(frame: pl.DataFrame, columns: list[str], fitted: np.ndarray) -> pl.DataFrame:
    """Each column divided by ``width^α``, α fitted on the ``fitted`` rows only."""
    narrow = frame.filter(pl.Series(fitted))
    exponents = {column: width_exponent(narrow, column) for column in columns}
    width = pl.col("run_width")
    return frame.with_columns(pl.col(c) / width.pow(a) for c, a in exponents.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=compose_config([]).tracking.uri)
    parser.add_argument("--experiment", default="population")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="conf/predictor.yaml overrides: ensemble=1")
    args = parser.parse_args()
    cfg = compose_config(args.overrides, name="predictor")
    mlflow.set_tracking_uri(args.tracking_uri)
    dataset = build_dataset(
        load_runs(MlflowClient(), args.experiment), args.k, "graph+curve+hparams"
    )
    frame, widths = dataset.frame, dataset.column("run_width")
    narrow = narrow_half(list(widths))
    y, groups = dataset.column(TARGET)[~narrow], np.asarray(dataset.groups)[~narrow]
    base = columns_of(dataset.feature_columns, "curve+hparams")
    graph = columns_of(dataset.feature_columns, "graph")
    curve = [c for c in columns_of(dataset.feature_columns, "curve") if c != "train_loss.sum"]
    variants = {
        "curve+hparams": (frame, base),
        "+ graph as logged": (frame, base + graph),
        "+ graph detrended": (detrended(frame, graph, narrow), base + graph),
        "+ graph and curves detrended": (detrended(frame, graph + curve, narrow), base + graph),
    }
    print(f"{frame.height} runs of {args.experiment!r}, k = {args.k}: fitted on widths "
          f"{sorted(set(widths[narrow]))}, scored on {sorted(set(widths[~narrow]))}")  # fmt: skip
    predicted = {}
    for name, (table, columns) in variants.items():
        predicted[name] = fit_and_score(Dataset(table), columns, narrow, cfg)[1]
        line = f"{name:<30}tau {stats.kendalltau(y, predicted[name]).statistic:.3f}"
        if name != "curve+hparams":
            gain = graph_gain(y, groups, predicted[name], predicted["curve+hparams"])
            line += f"  gain {gain['gain']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]"
        print(line, flush=True)


if __name__ == "__main__":
    main()
