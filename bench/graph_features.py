"""Which graph summaries earn their place: each family added to curve+hparams, per protocol.

    python bench/graph_features.py [OVERRIDES] [--tracking-uri sqlite:///mlflow.db]
        [--experiment hard] [--k 3] [--folds 5] [--families levels shape ...]

OVERRIDES: ``conf/predictor.yaml`` settings, such as ``ensemble=1`` (one fit, not the average).

The graph's summaries are grouped into families by what they measure (``FAMILIES``). Each
family is added to the curve and configuration features, and the model is scored three ways,
against curve+hparams alone fitted the same way:

- ``select``: fitted on the narrowest width, scored on the next one. Only the narrow half of
  the widths is read, so a choice made on it never sees the runs that width transfer scores;
- ``cv``: out of fold, 5 folds grouped by configuration (seed-twins share a fold);
- ``transfer``: fitted on the narrower half of the widths, scored on the wider half.

Each score is Kendall τ on all the runs it scores; each gain (τ with the family minus τ
without) has a 95% bootstrap interval over configurations. The families whose gain on
``select`` has an interval above 0 are then chosen, and their union is scored on the wide
half: the held-out answer to "does the graph help a model read wider networks". Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import mlflow
import numpy as np
from mlflow import MlflowClient
from predictor_quality import graph_gain, out_of_fold
from scipy import stats

from mlflow_tg.config import compose_config
from mlflow_tg.keys import TARGET
from mlflow_tg.predictor.dataset import Dataset, build_dataset
from mlflow_tg.predictor.evaluate import narrow_half
from mlflow_tg.predictor.features import columns_of, metric_reads
from mlflow_tg.predictor.fit import fit_and_score
from mlflow_tg.tracking.runs import load_runs

# family: the statistics (the part of a tg.* key after "/") it holds
FAMILIES = {
    "levels": ("mean", "std", "min", "q10", "q50", "q90", "max", "vertices", "edges",
               "depth0.mean", "depth1.mean", "depth2.mean", "depth3.mean"),
    "shape": ("gini", "entropy", "depth0.gini", "depth1.gini", "depth2.gini", "depth3.gini"),
    "participation": ("participation",),
    "profile": ("profile.entropy", "profile.centroid"),
    "growth": ("growth.mean", "growth.depthslope"),
    "radius": ("radius",),
}  # fmt: skip
SCALE_FREE = ("shape", "participation", "profile", "growth")
BASE = "curve+hparams"


def statistic(column: str, k: int) -> str:
    """``tg.strength/gini@2`` → ``gini``: the summary a graph feature column is built from."""
    return metric_reads(column, k)[0].split("/", 1)[1]


def family_columns(graph_columns: list[str], families: list[str], k: int) -> list[str]:
    """The graph columns of some families."""
    wanted = {stat for family in families for stat in FAMILIES[family]}
    return [column for column in graph_columns if statistic(column, k) in wanted]


def tau(actual: np.ndarray, predicted: np.ndarray) -> float:
    return float(stats.kendalltau(actual, predicted).statistic)


def score(dataset: Dataset, columns: list[str], cfg, folds: int, splits: dict) -> dict:
    """Predictions of one column set under each protocol (``select`` and ``transfer`` splits)."""
    predictions = {"cv": out_of_fold(dataset, columns, folds, cfg)}
    for protocol, (fitted, scored) in splits.items():
        predicted = np.full(dataset.frame.height, np.nan)
        predicted[~fitted] = fit_and_score(dataset, columns, fitted, cfg)[1]
        predictions[protocol] = predicted[scored]
    return predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=compose_config([]).tracking.uri)
    parser.add_argument("--experiment", default="hard")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--families", nargs="*", default=[*FAMILIES, "scale-free"])
    parser.add_argument("overrides", nargs="*", help="conf/predictor.yaml overrides: ensemble=1")
    args = parser.parse_args()
    cfg = compose_config(args.overrides, name="predictor")
    mlflow.set_tracking_uri(args.tracking_uri)
    records = load_runs(MlflowClient(), args.experiment)
    dataset = build_dataset(records, args.k, "graph+curve+hparams")
    y, widths = dataset.column(TARGET), dataset.column("run_width")
    groups = np.asarray(dataset.groups)
    distinct = sorted(set(widths))
    narrow = narrow_half(list(widths))
    splits = {  # protocol: (rows fitted on, rows scored)
        "select": (widths == distinct[0], widths == distinct[1]),
        "transfer": (narrow, ~narrow),
    }
    scored = {"cv": np.ones(len(y), dtype=bool)} | {p: rows for p, (_, rows) in splits.items()}
    print(f"{dataset.frame.height} runs of {args.experiment!r}, k = {args.k}; select: fitted on "
          f"width {distinct[0]:g}, scored on {distinct[1]:g}; transfer: fitted on widths "
          f"{sorted(set(widths[narrow]))}, scored on {sorted(set(widths[~narrow]))}")  # fmt: skip
    base_columns = columns_of(dataset.feature_columns, BASE)
    graph_columns = columns_of(dataset.feature_columns, "graph")
    start = time.perf_counter()
    base = score(dataset, base_columns, cfg, args.folds, splits)
    print(f"{BASE}: " + "  ".join(f"{p} {tau(y[scored[p]], base[p]):.3f}" for p in base)
          + f"  ({time.perf_counter() - start:.0f} s)")  # fmt: skip
    header = f"{'+ family':<16}{'columns':>8}"
    print(header + "".join(f"{p + ' tau':>12}{'gain [95% interval]':>29}" for p in base))
    rows = {}

    def evaluate(name: str, families: list[str]) -> None:
        extra = family_columns(graph_columns, families, args.k)
        if not extra:
            print(f"{name:<16}{0:>8}   (no such summaries logged)")
            return
        predicted = score(dataset, base_columns + extra, cfg, args.folds, splits)
        row, line = {"columns": len(extra)}, f"{name:<16}{len(extra):>8}"
        for protocol, values in predicted.items():
            actual = y[scored[protocol]]
            gain = graph_gain(actual, groups[scored[protocol]], values, base[protocol])
            row[protocol] = {"tau": tau(actual, values)} | gain
            line += f"{row[protocol]['tau']:>12.3f}{gain['gain']:>+10.3f} "
            line += f"[{gain['low']:+.3f}, {gain['high']:+.3f}]"
        rows[name] = row
        print(line, flush=True)

    for name in args.families:
        evaluate(name, list(SCALE_FREE) if name == "scale-free" else [name])
    chosen = [n for n in FAMILIES if n in rows and rows[n]["select"]["low"] > 0]
    print(f"chosen on select (gain interval above 0): {chosen or 'none'}")
    if chosen:
        evaluate("chosen", chosen)
    print(json.dumps({"runs": dataset.frame.height, "k": args.k, "chosen": chosen,
                      "base": {p: tau(y[scored[p]], base[p]) for p in base},
                      "families": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
