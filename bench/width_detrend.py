"""Width transfer with the graph's dependence on width taken out: divided out, or left out.

    python bench/width_detrend.py [OVERRIDES] [--tracking-uri sqlite:///mlflow.db]
        [--experiment population] [--k 3] [--variants NAME ...] [--in-distribution]

OVERRIDES: ``conf/predictor.yaml`` settings, such as ``ensemble=1`` (one fit, not the average).

A summary whose level grows like ``width^α`` tells a tree fitted on narrow networks nothing it
can use on wide ones. Here each column's α is fitted on the narrow half of the widths only: the
median of ``|column|`` per (model family, width), regressed in log-log within each family. Then
either every row is divided by its ``width^α`` (``detrended``), or only the graph columns with
``|α| < 0.1`` are kept (``stable``: their level moves by less than 15% from width w to 4w),
or every graph column is replaced by its percentile rank among the runs of the same model
family and width (``ranked``: no level is left to shift; it reads the other runs of a width,
their features only, so it ranks runs within a sweep, not one run alone).
The model fitted on the narrow half scores the wide half. Six column sets, each fitted on the
same rows: curve+hparams; with the graph as logged (``logged``); with the graph detrended
(``detrended``); with the graph and the curves detrended (``all-detrended``); with the stable
graph columns (``stable``); with the graph ranked within each width (``ranked``). Prints
Kendall τ on the wide runs and each gain over curve+hparams with its 95% bootstrap interval
over configurations. With ``--in-distribution``, also τ on the same wide runs from 5-fold
cross-validation over all widths (grouped by configuration), the model having seen other
wide runs: width transfer's target is to lose at most 0.05 against it.
"""

from __future__ import annotations

import argparse

import mlflow
import numpy as np
import polars as pl
from mlflow import MlflowClient
from predictor_quality import graph_gain, out_of_fold
from scipy import stats

from mlflow_tg.config import compose_config
from mlflow_tg.keys import TARGET
from mlflow_tg.predictor.dataset import Dataset, build_dataset
from mlflow_tg.predictor.evaluate import narrow_half
from mlflow_tg.predictor.features import columns_of
from mlflow_tg.predictor.fit import fit_and_score
from mlflow_tg.tracking.runs import load_runs

# |α| below which a column counts as free of width: width^0.1 grows by 15% from w to 4w.
STABLE = 0.1


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


def stable_columns(frame: pl.DataFrame, columns: list[str], fitted: np.ndarray) -> list[str]:
    """The columns whose level moves with width by ``|α| < STABLE`` on the ``fitted`` rows.

    A column whose α cannot be fitted (zero at every narrow width) counts as stable.
    """
    narrow = frame.filter(pl.Series(fitted))
    return [column for column in columns if abs(width_exponent(narrow, column)) < STABLE]


def ranked_within_width(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """Each column as its percentile rank in (0, 1) among the runs of its model family and width.

    Missing values stay missing and are not counted.
    """
    width_group = ["model", "run_width"]
    return frame.with_columns(
        ((pl.col(c).rank("average") - 0.5) / pl.col(c).count()).over(width_group) for c in columns
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=compose_config([]).tracking.uri)
    parser.add_argument("--experiment", default="population")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--variants", nargs="*", help="the column sets to fit (default: all)")
    parser.add_argument("--in-distribution", action="store_true",
                        help="τ of the wide runs out of fold, all widths fitted")  # fmt: skip
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
    stable = stable_columns(frame, graph, narrow)
    variants = {
        "curve+hparams": (frame, base),
        "logged": (frame, base + graph),
        "detrended": (detrended(frame, graph, narrow), base + graph),
        "all-detrended": (detrended(frame, graph + curve, narrow), base + graph),
        "stable": (frame, base + stable),
        "ranked": (ranked_within_width(frame, graph), base + graph),
    }
    chosen = args.variants or list(variants)
    if unknown := sorted(set(chosen) - set(variants)):
        parser.error(f"unknown --variants {unknown}; choose among {list(variants)}")
    print(f"{frame.height} runs of {args.experiment!r}, k = {args.k}: fitted on widths "
          f"{sorted(set(widths[narrow]))}, scored on {sorted(set(widths[~narrow]))}; "
          f"{len(stable)} of {len(graph)} graph columns stable")  # fmt: skip
    predicted = {}
    for name in ["curve+hparams", *[v for v in chosen if v != "curve+hparams"]]:
        table, columns = variants[name]
        predicted[name] = fit_and_score(Dataset(table), columns, narrow, cfg)[1]
        line = f"{name:<16}tau {stats.kendalltau(y, predicted[name]).statistic:.3f}"
        if name != "curve+hparams":
            gain = graph_gain(y, groups, predicted[name], predicted["curve+hparams"])
            line += f"  gain {gain['gain']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]"
        if args.in_distribution:
            inside = out_of_fold(Dataset(table), columns, 5, cfg)[~narrow]
            tau = stats.kendalltau(y, inside).statistic
            line += f"  in distribution {tau:.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
