"""The predictor's target: the final accuracy, or the gain after epoch k added to val_acc@k.

    python bench/gain_target.py [OVERRIDES] [--tracking-uri sqlite:///mlflow.db]
        [--experiment population] [--outside offgrid offgrid2] [--k 3]
        [--sets curve+hparams graph+curve+hparams]

OVERRIDES: ``conf/predictor.yaml`` settings, such as ``ensemble=1`` (one fit, not the average).

A tree cannot predict beyond the targets it was fitted on. Fitted on the gain still to come
after epoch k (final test accuracy minus ``val_acc@k``) and added back to the run's own
``val_acc@k``, a prediction is anchored on what the run has already reached, which could carry
to wider networks and to configurations off the grid. For each feature set and both targets,
prints Kendall τ: out of fold over the population (5 folds grouped by configuration); width
transfer (fitted on the narrow half of the widths, scored on the wide half) next to the same
wide runs out of fold ("wide in-dist"); and, per ``--outside`` sweep, fitted on the whole
population and scored on that sweep.
"""

from __future__ import annotations

import argparse
import time

import mlflow
import numpy as np
import polars as pl
from mlflow import MlflowClient
from predictor_quality import out_of_fold, with_outside
from scipy import stats

from mlflow_tg.config import compose_config
from mlflow_tg.keys import TARGET
from mlflow_tg.predictor.dataset import Dataset, build_dataset
from mlflow_tg.predictor.evaluate import narrow_half
from mlflow_tg.predictor.features import FEATURE_SETS, columns_of
from mlflow_tg.predictor.fit import fit_and_score
from mlflow_tg.tracking.runs import load_runs


def as_gain(dataset: Dataset, k: int) -> tuple[Dataset, np.ndarray]:
    """The dataset with the gain after epoch k as its target, and each run's ``val_acc@k``."""
    base = dataset.frame[f"val_acc@{k}"].fill_null(0.0).to_numpy()
    frame = dataset.frame.with_columns((pl.col(TARGET) - pl.Series(base)).alias(TARGET))
    return Dataset(frame), base


def anchored(dataset: Dataset, target: str, k: int) -> tuple[Dataset, np.ndarray]:
    """The dataset to fit for ``target``, and what to add back to its predictions."""
    if target == "final":
        return dataset, np.zeros(dataset.frame.height)
    return as_gain(dataset, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=compose_config([]).tracking.uri)
    parser.add_argument("--experiment", default="population")
    parser.add_argument("--outside", nargs="*", default=[], help="sweeps to score, fitted on all")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--sets", nargs="*", default=["curve+hparams", "graph+curve+hparams"])
    parser.add_argument("overrides", nargs="*", help="conf/predictor.yaml overrides: ensemble=1")
    args = parser.parse_args()
    cfg = compose_config(args.overrides, name="predictor")
    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient()
    population = build_dataset(load_runs(client, args.experiment), args.k, "+".join(FEATURE_SETS))
    outsides = {name: load_runs(client, name) for name in args.outside}
    y, narrow = population.column(TARGET), narrow_half(list(population.column("run_width")))
    print(f"{population.frame.height} runs of {args.experiment!r}, k = {args.k}")
    for name in args.sets:
        columns = columns_of(population.feature_columns, name)
        for target in ("final", "gain"):
            started = time.monotonic()
            data, base = anchored(population, target, args.k)
            cv = out_of_fold(data, columns, 5, cfg) + base
            wide = fit_and_score(data, columns, narrow, cfg)[1] + base[~narrow]
            line = (
                f"{name:<22}{target:<6}cv {stats.kendalltau(y, cv).statistic:.3f}"
                f"  transfer {stats.kendalltau(y[~narrow], wide).statistic:.3f}"
                f"  wide in-dist {stats.kendalltau(y[~narrow], cv[~narrow]).statistic:.3f}"
            )
            for outside, records in outsides.items():
                both, away = with_outside(population, records, args.k)
                data, base = anchored(both, target, args.k)
                scored = fit_and_score(data, columns, ~away, cfg)[1] + base[away]
                tau = stats.kendalltau(both.column(TARGET, away), scored).statistic
                line += f"  {outside} {tau:.3f}"
            print(f"{line}  ({time.monotonic() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
