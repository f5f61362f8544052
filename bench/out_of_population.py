"""The registered champion on runs it never saw: held out of its population, and off its grid.

    python bench/out_of_population.py [--tracking-uri sqlite:///mlflow.db] [--outside offgrid]
        [--population population] [--model NAME] [--alias champion | --version N] [--k K]

Scores, with the champion (or the version asked for) as it is registered (its own windows,
interval and distribution check), two sets of runs: the population's runs held out of its fit
(the version's recorded split: configurations it never saw) and a sweep off the population's
grid (``make offgrid``: seeds, widths and learning rates never used, some outside the
population's range). For each
it prints Kendall τ, Spearman ρ and MAE of the prediction at the version's k, the coverage of
its 80% interval, the share of runs flagged out of distribution (and τ among the flagged and
the unflagged runs: what the flag tells a user), and the two rankings every
sweep has for free: ``val_acc`` at epoch k and minus the training loss summed over 1..k.
"""

from __future__ import annotations

import argparse
import logging

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from scipy import stats

from mlflow_tg import keys
from mlflow_tg.predictor.answering import model_input
from mlflow_tg.predictor.registry import FeatureSpec
from mlflow_tg.tracking.runs import load_runs


def usable(records, k: int) -> list:
    """Finished, unpruned runs with a final accuracy and epochs 0..k."""
    return [
        r
        for r in records
        if r.history
        and keys.TARGET in r.metrics
        and r.tags.get(keys.PRUNED) != "true"
        and len(r.history) > k
    ]


def score(model, records, k: int) -> dict[str, float]:
    """The champion's quality on some runs, from their epochs 0..k, next to the baselines."""
    frames = [
        model_input([row for row in r.history if row["epoch"] <= k], r.params, r.run_id)
        for r in records
    ]
    answer = model.predict(pd.concat(frames, ignore_index=True))
    actual = np.array([r.metrics[keys.TARGET] for r in records])
    point = answer[keys.ANSWER].to_numpy(float)
    low, high = answer[keys.ANSWER_LOW].to_numpy(float), answer[keys.ANSWER_HIGH].to_numpy(float)
    by_epoch = [{int(row["epoch"]): row for row in r.history} for r in records]
    val_acc = np.array([rows[k].get(keys.VAL_ACC, -np.inf) for rows in by_epoch])
    loss = np.array([sum(rows[e].get(keys.TRAIN_LOSS, np.inf) for e in range(1, k + 1))
                     for rows in by_epoch])  # fmt: skip
    flagged = answer[keys.ANSWER_OOD].to_numpy(bool)
    return {
        "runs": len(records),
        "tau": stats.kendalltau(actual, point).statistic,
        "tau unflagged": stats.kendalltau(actual[~flagged], point[~flagged]).statistic,
        "tau flagged": stats.kendalltau(actual[flagged], point[flagged]).statistic,
        "rho": stats.spearmanr(actual, point).statistic,
        "mae_points": 100 * np.abs(actual - point).mean(),
        "coverage80": np.mean((low <= actual) & (actual <= high)),
        "flagged": flagged.mean(),
        "tau val_acc@k": stats.kendalltau(actual, val_acc).statistic,
        "tau -train_loss.sum": stats.kendalltau(actual, -np.nan_to_num(loss, nan=np.inf)).statistic,
    }


def main() -> None:
    """Both sets of runs, one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--population", default="population")
    parser.add_argument("--outside", default="offgrid")
    parser.add_argument("--model", default=keys.REGISTERED_MODEL)
    parser.add_argument("--alias", default=keys.CHAMPION)
    parser.add_argument("--version", help="a version number, in place of --alias")
    parser.add_argument("--k", type=int, help="ask from epochs 0..K (default: the version's k)")
    args = parser.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri)
    logging.getLogger("mlflow.models.utils").setLevel(logging.ERROR)  # extra history columns
    client = MlflowClient()
    version = (
        client.get_model_version(args.model, args.version)
        if args.version
        else client.get_model_version_by_alias(args.model, args.alias)
    )
    spec = FeatureSpec.of_version(version)
    k = spec.k if args.k is None else args.k
    model = mlflow.pyfunc.load_model(f"models:/{args.model}/{version.version}")
    population = usable(load_runs(client, args.population), k)
    held = spec.holdout.rows([r.group for r in population])
    sets = {
        f"{args.population} held out": [r for r, h in zip(population, held, strict=True) if h],
        args.outside: usable(load_runs(client, args.outside), k),
    }
    print(f"{args.model} v{version.version} ({spec.sets}, k={spec.k}, windows {spec.ks}), "
          f"asked from epochs 0..{k}")  # fmt: skip
    results = {name: score(model, records, k) for name, records in sets.items()}
    print(pd.DataFrame(results).T.round(3).to_string())
    inside, outside = (results[name]["tau"] for name in sets)
    print(f"out-of-population tau minus in-population tau: {outside - inside:+.3f}")


if __name__ == "__main__":
    main()
