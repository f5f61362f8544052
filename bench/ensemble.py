"""What averaging fits buys: each fit of the predictor's ensemble scored alone, and the ensemble.

    python bench/ensemble.py [--tracking-uri sqlite:///mlflow.db] [--experiment hard]
        [--outside hard-offgrid [hard-offgrid2 ...]] [--k 3] [--protocols cv transfer outside]
        [--members 5]

The predictor keeps the columns CatBoost's selection keeps, then fits them ``ensemble`` times,
each fit in its own column order and with its own seed, and averages the fits (``ensemble.py``).
For curve+hparams and graph+curve+hparams, under each protocol (out of fold in 5 folds grouped
by configuration, ``cv``; fitted on the narrow half of the widths and scored on the wide half,
``transfer``; fitted on the population and scored on the ``--outside`` sweeps, ``outside``), it
prints Kendall τ of each fit alone (the first is what a single fit gives: the table's column
order and seed), their mean, and the ensemble's τ; then the graph's gain, τ of
graph+curve+hparams minus curve+hparams, for the first fit and for the ensemble, with 95%
bootstrap intervals over configurations; and the fitting time of the ensembles, next to that
of fitting their fits again without the selection (``refit``).
"""

from __future__ import annotations

import time

import numpy as np
from column_order import SETS, options, read_protocols
from predictor_quality import graph_gain
from scipy import stats
from sklearn.model_selection import GroupKFold

from mlflow_tg.config import compose_config
from mlflow_tg.keys import TARGET
from mlflow_tg.predictor.ensemble import Ensemble
from mlflow_tg.predictor.features import columns_of
from mlflow_tg.predictor.fit import fit, predict, refit


def fitted_predictions(dataset, columns, fitted, scored, cfg, times) -> np.ndarray:
    """Each fit's predictions of the ``scored`` rows, then the ensemble's ((fits + 1) × rows).

    The ensemble's as the registered model answers: the fits' quantiles averaged, then sorted
    and clipped. Fitting times go to ``times``.
    """
    x, y = dataset.matrix(columns, fitted), dataset.column(TARGET, fitted)
    start = time.perf_counter()
    model = fit(x, y, cfg)
    total = time.perf_counter() - start
    start = time.perf_counter()
    refit(model, x, y, cfg)  # the fits again, without the selection
    times.append((total, time.perf_counter() - start))
    rows = dataset.matrix(columns, scored)
    alone = [predict(Ensemble([member]), rows) for member in model.members]
    return np.array([*alone, predict(model, rows)])


def out_of_fold(dataset, columns, cfg, times) -> np.ndarray:
    """``fitted_predictions`` out of fold for every row, 5 folds grouped by configuration."""
    groups = dataset.groups
    predicted = np.empty((cfg.ensemble + 1, len(groups)))
    for fitted_rows, scored_rows in GroupKFold(5).split(groups, groups=groups):
        fitted = np.zeros(len(groups), dtype=bool)
        fitted[fitted_rows] = True
        predicted[:, scored_rows] = fitted_predictions(dataset, columns, fitted, ~fitted, cfg,
                                                       times)  # fmt: skip
    return predicted


def main() -> None:
    parser = options(__doc__.splitlines()[0], ["cv", "transfer", "outside"])
    default = compose_config([], name="predictor").ensemble
    parser.add_argument("--members", type=int, default=default)
    args = parser.parse_args()
    cfg = compose_config([f"ensemble={args.members}"], name="predictor")
    population, protocols = read_protocols(args)
    print(f"ensemble of {cfg.ensemble} fits, max_features {cfg.max_features}")
    predicted, times = {}, {name: [] for name in SETS}
    for name in SETS:
        columns = columns_of(population.feature_columns, name)
        for protocol, (dataset, fitted, scored) in protocols.items():
            actual = dataset.column(TARGET, scored)
            found = (
                out_of_fold(dataset, columns, cfg, times[name])
                if protocol == "cv"
                else fitted_predictions(dataset, columns, fitted, scored, cfg, times[name])
            )
            predicted[name, protocol] = found
            taus = [stats.kendalltau(actual, one).statistic for one in found[:-1]]
            together = stats.kendalltau(actual, found[-1]).statistic
            print(f"{name:<22}{protocol:<10}tau per fit " + " ".join(f"{t:.3f}" for t in taus)
                  + f"  mean {np.mean(taus):.3f}  ensemble {together:.3f}", flush=True)  # fmt: skip
    for protocol, (dataset, _, scored) in protocols.items():
        actual, groups = dataset.column(TARGET, scored), np.asarray(dataset.groups)[scored]
        with_graph, without = predicted[SETS[1], protocol], predicted[SETS[0], protocol]
        pairs = {
            "first fit": (with_graph[0], without[0]),
            "ensemble": (with_graph[-1], without[-1]),
        }
        for label, (a, b) in pairs.items():
            gain = graph_gain(actual, groups, a, b)
            print(f"graph gain, {protocol}, {label}: {gain['gain']:+.3f} "
                  f"[{gain['low']:+.3f}, {gain['high']:+.3f}]")  # fmt: skip
    for name, pairs in times.items():
        total, fits = np.sum(pairs, axis=0)
        print(f"{name}: {len(pairs)} ensembles fitted in {total:.0f} s, selection included; "
              f"their {cfg.ensemble} fits again alone took {fits:.0f} s "
              f"({fits / cfg.ensemble / len(pairs):.1f} s per fit)")  # fmt: skip


if __name__ == "__main__":
    main()
