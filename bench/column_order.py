"""How much of a gain is the columns' order: each fit repeated with the columns shuffled.

    python bench/column_order.py [--tracking-uri sqlite:///mlflow.db] [--experiment hard]
        [--outside hard-offgrid [hard-offgrid2 ...]] [--orders 5] [--k 3]
        [--protocols transfer outside cv]

CatBoost's recursive feature elimination keeps different columns when the same columns come in
another order, so one fit's τ, and one fit's graph gain, carry that chance with them. For
curve+hparams and graph+curve+hparams, each is fitted ``--orders`` times, in the table's order
and then in shuffled orders: on the narrow half of the widths, scoring the wide half
(``transfer``), on the whole population, scoring the ``--outside`` sweeps (``outside``), and out
of fold in 5 folds grouped by configuration (``cv``). Prints Kendall τ of each fit, of the mean
of the fits' predictions, and the graph's gain with the mean predictions, with its 95%
bootstrap interval over configurations.
"""

from __future__ import annotations

import argparse

import mlflow
import numpy as np
from mlflow import MlflowClient
from predictor_quality import graph_gain, out_of_fold, with_outside
from scipy import stats

from mlflow_tg.config import compose_config
from mlflow_tg.keys import TARGET
from mlflow_tg.predictor.dataset import build_dataset
from mlflow_tg.predictor.evaluate import narrow_half
from mlflow_tg.predictor.features import columns_of
from mlflow_tg.predictor.fit import fit_and_score
from mlflow_tg.tracking.runs import load_runs

SETS = ("curve+hparams", "graph+curve+hparams")


def options(description: str, protocols: list[str]) -> argparse.ArgumentParser:
    """The store, the two sweeps, k and the protocols to score (``protocols`` by default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tracking-uri", default=compose_config([]).tracking.uri)
    parser.add_argument("--experiment", default="hard")
    parser.add_argument("--outside", nargs="+", default=["hard-offgrid"],
                        help="sweeps off the population's grid, scored together")  # fmt: skip
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--protocols", nargs="+", default=protocols,
                        choices=["transfer", "outside", "cv"])  # fmt: skip
    return parser


def read_protocols(args: argparse.Namespace):
    """The population's dataset, and each protocol's (dataset, rows fitted on, rows scored).

    ``cv`` fits out of fold: every row is fitted on and scored.
    """
    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient()
    population = build_dataset(load_runs(client, args.experiment), args.k, "graph+curve+hparams")
    read_outside = "outside" in args.protocols  # CV and transfer read the population only
    outside = (
        [run for name in args.outside for run in load_runs(client, name)] if read_outside else []
    )
    both, away = with_outside(population, outside, args.k)
    narrow = narrow_half(list(population.column("run_width")))
    every = np.ones(population.frame.height, dtype=bool)
    protocols = {
        "transfer": (population, narrow, ~narrow),
        "outside": (both, ~away, away),
        "cv": (population, every, every),
    }
    print(f"{args.experiment!r}: {population.frame.height} runs, {' + '.join(args.outside)}: "
          f"{away.sum()} runs, k = {args.k}")  # fmt: skip
    return population, {name: protocols[name] for name in args.protocols}


def main() -> None:
    parser = options(__doc__.splitlines()[0], ["transfer", "outside"])
    parser.add_argument("--orders", type=int, default=5)
    args = parser.parse_args()
    cfg = compose_config(["ensemble=1"], name="predictor")
    population, protocols = read_protocols(args)
    print(f"{args.orders} column orders, one fit each")
    rng = np.random.default_rng(0)
    mean = {}
    for name in SETS:
        in_table_order = columns_of(population.feature_columns, name)
        orders = [in_table_order] + [
            list(rng.permutation(in_table_order)) for _ in range(args.orders - 1)
        ]
        for protocol, (dataset, fitted, scored) in protocols.items():
            actual = dataset.column(TARGET, scored)
            runs = [
                out_of_fold(dataset, columns, 5, cfg)
                if protocol == "cv"
                else fit_and_score(dataset, columns, fitted, cfg)[1]
                for columns in orders
            ]
            mean[name, protocol] = np.mean(runs, axis=0)
            taus = [stats.kendalltau(actual, predicted).statistic for predicted in runs]
            together = stats.kendalltau(actual, mean[name, protocol]).statistic
            print(f"{name:<22}{protocol:<10}tau per order " + " ".join(f"{t:.3f}" for t in taus)
                  + f"  mean of the predictions {together:.3f}", flush=True)  # fmt: skip
    for protocol, (dataset, _, scored) in protocols.items():
        groups = np.asarray(dataset.groups)[scored]
        gain = graph_gain(
            dataset.column(TARGET, scored), groups, mean[SETS[1], protocol], mean[SETS[0], protocol]
        )
        print(f"graph gain, {protocol}, mean predictions: {gain['gain']:+.3f} "
              f"[{gain['low']:+.3f}, {gain['high']:+.3f}]")  # fmt: skip


if __name__ == "__main__":
    main()
