"""Predictor quality on a population, next to its baselines, and the serving latency.

    python bench/predictor_quality.py [OVERRIDES] [--tracking-uri sqlite:///mlflow.db]
        [--experiment population] [--outside offgrid] [--ks 1 2 3 5] [--folds 5]
        [--sets graph curve+hparams ...] [--requests 200]

OVERRIDES: ``conf/predictor.yaml`` settings, such as ``ensemble=1`` (one fit, not the average).

Reads the finished runs of the population (``python train.py -m +experiment=population``, made
once, then reused). For each k and each feature set: out-of-fold predictions from grouped
cross-validation (seed-twins share a fold, so no model sees a twin of a run it scores) and
their R², MAE (accuracy points), Spearman ρ and Kendall τ, on all runs and on the non-trivial
ones (final accuracy > 0.5); next to the baselines a sweep would use anyway: ranking by
``val_acc`` at epoch k, and by minus the summed training loss (training speed, Ru et al.
2021). Width transfer: fitted on the narrower half of the widths, scored on the wider half.
Leave one architecture out: fitted on the other model families, scored on one, pooled. Outside:
fitted on the whole population, scored on another sweep (``--outside``). The noise ceiling:
how well one seed's final accuracy ranks its twin's, per protocol on the runs it scores; and
the graph's gain, τ of graph+curve+hparams minus curve+hparams, with a 95% bootstrap interval
over configurations. Transfer and outside are also set against τ in distribution on the same
runs (cross-validated over all widths, or over both sweeps together). Then the latency of
the k=3 combined model: 200 single-row requests to ``mlflow models serve`` on loopback, and
in-process pyfunc predictions. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import requests
from mlflow import MlflowClient
from mlflow.models import infer_signature
from omegaconf import OmegaConf
from scipy import stats
from sklearn.model_selection import GroupKFold

from mlflow_tg.config import compose_config
from mlflow_tg.keys import TARGET
from mlflow_tg.predictor.dataset import Dataset, build_dataset
from mlflow_tg.predictor.endpoint import request_body
from mlflow_tg.predictor.evaluate import (
    quality_by_subset,
    seed_twin_agreement,
    transfer_split,
)
from mlflow_tg.predictor.features import FEATURE_SETS, columns_of
from mlflow_tg.predictor.fit import fit, fit_and_score
from mlflow_tg.tracking.runs import load_runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests/
from tests.servers import free_port, running_server

SETS = ["graph", "curve", "hparams", "curve+hparams", "graph+hparams", "graph+curve+hparams"]
NONTRIVIAL = 0.5


def out_of_fold(dataset, columns, folds: int, cfg) -> np.ndarray:
    """Each run's prediction by the model fitted on the other folds (seed-twins share a fold).

    sklearn's GroupKFold, not the hashed placement of the registry's holdout (``in_holdout``):
    every run is scored here on every call, so a run need not keep its fold as the population
    grows, and GroupKFold balances the folds (24 configurations × 2 seeds in 5 folds: hashed
    2-14 runs per fold, GroupKFold 8-10).
    """
    groups = dataset.groups
    predicted = np.empty(len(groups))
    for fitted, scored in GroupKFold(folds).split(groups, groups=groups):
        train = np.zeros(len(groups), dtype=bool)
        train[fitted] = True
        predicted[scored] = fit_and_score(dataset, columns, train, cfg)[1]
    return predicted


def evaluate_k(
    records, k: int, cfg, folds_count: int, outside: list | None = None, sets: list | None = None
) -> dict:
    """Every feature set and both baselines at one k, in four protocols.

    Cross-validated (``cv``), width-transferred (``transfer``), leave-one-architecture-out
    (``architecture``: fitted on the other model families, scored on one, pooled over the
    families) and, given runs of another sweep (``outside``), fitted on the whole population
    and scored on that sweep. Keeps each protocol's scored runs and predictions (``scored``) for
    the graph's gain and the seed-twin ceilings.
    """
    population = build_dataset(records, k, "+".join(FEATURE_SETS))
    narrow, transfer = transfer_split(population.frame["run_width"].to_list())
    wide = ~narrow if narrow.any() else narrow  # one width: no transfer, NaN scores
    y = population.column(TARGET)
    families = population.frame["model"].to_numpy()
    both, away = with_outside(population, outside or [], k)
    scored_rows = {"cv": np.ones(len(y), dtype=bool), "transfer": wide,
                   "architecture": np.ones(len(y), dtype=bool)}  # fmt: skip
    rows, predictions = {}, {}
    for name in sets or SETS:
        columns = columns_of(population.feature_columns, name)
        predictions[name] = {
            "cv": out_of_fold(population, columns, folds_count, cfg),
            "transfer": fit_and_score(population, columns, narrow, cfg)[1]
            if wide.any()
            else y[wide],
            "architecture": leave_one_family_out(population, columns, families, cfg),
        }
        if away.any():
            predictions[name]["outside"] = fit_and_score(both, columns, ~away, cfg)[1]
            # in distribution for the outside runs: cross-validated over both sweeps together
            predictions[name]["outside_cv"] = out_of_fold(both, columns, folds_count, cfg)[away]
        rows[name] = {
            protocol: quality_by_subset(
                both.column(TARGET, away) if protocol == "outside" else y[scored_rows[protocol]],
                predicted,
                NONTRIVIAL,
            )
            for protocol, predicted in predictions[name].items()
            if protocol != "outside_cv"
        }
    baselines = {f"val_acc@{k}": f"val_acc@{k}"}
    if k >= 1:
        baselines[f"-train_loss.sum@1..{k}"] = "train_loss.sum"
    for name, column in baselines.items():
        sign = -1 if column == "train_loss.sum" else 1  # less loss, faster training: ranks first
        score = np.nan_to_num(sign * population.column(column), nan=-np.inf)  # none: ranks last
        rows[name] = {
            protocol: quality_by_subset(y[chosen], score[chosen], NONTRIVIAL)
            for protocol, chosen in scored_rows.items()
        }
        if away.any():
            score = np.nan_to_num(sign * both.column(column, away), nan=-np.inf)
            rows[name]["outside"] = quality_by_subset(both.column(TARGET, away), score, NONTRIVIAL)
        if not name.startswith("val_acc"):  # a ranking score, not an accuracy: no R² or MAE
            for subsets in rows[name].values():
                for scores in subsets.values():
                    scores["r2"] = scores["mae_points"] = float("nan")
    scored = {protocol: scored_runs(population, chosen) for protocol, chosen in scored_rows.items()}
    if away.any():
        scored["outside"] = scored_runs(both, away)
    return {
        "runs": population.frame.height,
        "left_out": population.left_out,
        "transfer": transfer,
        "wide": wide,
        "rows": rows,
        "scored": scored,
        "predictions": predictions,
    }


def leave_one_family_out(dataset, columns, families: np.ndarray, cfg) -> np.ndarray:
    """Each run's prediction by the model fitted on the runs of the other model families."""
    predicted = np.full(len(families), np.nan)  # one family: nothing to fit on
    if len(np.unique(families)) < 2:
        return predicted
    for family in np.unique(families):
        held = families == family
        predicted[held] = fit_and_score(dataset, columns, ~held, cfg)[1]
    return predicted


def scored_runs(dataset, chosen: np.ndarray) -> dict[str, np.ndarray]:
    """The final accuracy, configuration and seed of the runs a protocol scores."""
    frame = dataset.frame.filter(pl.Series(chosen))
    return {
        "actual": frame[TARGET].to_numpy(),
        "group": frame["group"].to_numpy(),
        "seed": frame["seed"].to_numpy(),
    }


def graph_gain(actual, groups, with_graph, without, draws: int = 1000, seed: int = 0) -> dict:
    """τ(with the graph) − τ(without), and its 95% bootstrap interval over configurations.

    Configurations, not runs, are resampled: seed-twins are not independent draws.
    """
    if len(actual) < 3 or np.isnan(with_graph).any() or np.isnan(without).any():
        return dict.fromkeys(("gain", "low", "high"), np.nan)  # nothing scored
    by_group = {}
    for i, group in enumerate(groups):
        by_group.setdefault(group, []).append(i)
    members = list(by_group.values())
    rng = np.random.default_rng(seed)

    def gain(rows) -> float:
        return (
            stats.kendalltau(actual[rows], with_graph[rows]).statistic
            - stats.kendalltau(actual[rows], without[rows]).statistic
        )

    draws_ = []
    for _ in range(draws):
        picked = rng.integers(len(members), size=len(members))
        draws_.append(gain(np.concatenate([members[j] for j in picked])))
    low, high = np.nanpercentile(draws_, [2.5, 97.5])
    return {"gain": gain(np.arange(len(actual))), "low": low, "high": high}


def with_outside(population, outside: list, k: int):
    """The population's rows followed by the outside sweep's, and which rows are outside."""
    if not outside:
        return population, np.zeros(population.frame.height, dtype=bool)
    away = build_dataset(outside, k, "+".join(FEATURE_SETS))
    frame = pl.concat([population.frame, away.frame], how="diagonal_relaxed")
    mask = np.arange(frame.height) >= population.frame.height
    return Dataset(frame), mask


def print_k(k: int, result: dict) -> None:
    """One table per k: each predictor on all runs and on non-trivial runs."""
    print(f"\nk = {k}: {result['runs']} runs (left out: {result['left_out'] or 'none'})")
    print(f"width transfer: {result['transfer']}")
    header = f"{'features':<26}{'split':<9}"
    for subset in ("all", "nontrivial"):
        header += "".join(f"{subset[:3] + ' ' + m:>11}" for m in ("R2", "MAE", "rho", "tau"))
    print(header)
    for name, splits in result["rows"].items():
        for split, subsets in splits.items():
            line = f"{name:<26}{split:<9}"
            for subset in ("all", "nontrivial"):
                q = subsets[subset]
                line += "".join(
                    f"{q[m]:>11.3f}" for m in ("r2", "mae_points", "spearman", "kendall_tau")
                )
            print(line)


def print_gaps(result: dict) -> None:
    """Kendall τ out of population against in population (cross-validated), on all runs."""
    print(f"{'features':<26}{'tau cv':>9}{'tau outside':>13}{'gap':>8}")
    for name, splits in result["rows"].items():
        if "outside" in splits:
            inside = splits["cv"]["all"]["kendall_tau"]
            away = splits["outside"]["all"]["kendall_tau"]
            print(f"{name:<26}{inside:>9.3f}{away:>13.3f}{away - inside:>+8.3f}")


def print_same_runs(result: dict) -> None:
    """τ of each protocol against τ in distribution on the same runs.

    τ depends on the runs it ranks: the wide runs of width transfer are closer to each other
    than the whole population, and the outside sweep has its own mix. In distribution on the
    same runs is the cross-validated prediction of exactly the runs the protocol scores: for
    transfer, out of fold over all widths; outside, out of fold over both sweeps together.
    """
    scored, wide = result["scored"], result["wide"]
    print(f"{'features':<26}{'protocol':<10}{'runs':>6}{'tau in distribution':>21}"
          f"{'tau protocol':>14}{'gap':>8}")  # fmt: skip
    for name, predicted in result["predictions"].items():
        pairs = {"transfer": (predicted["cv"][wide], predicted["transfer"])}
        if "outside_cv" in predicted:
            pairs["outside"] = (predicted["outside_cv"], predicted["outside"])
        for protocol, (inside, away) in pairs.items():
            actual = scored[protocol]["actual"]
            if len(actual) < 3:
                continue
            tau_in = stats.kendalltau(actual, inside).statistic
            tau_away = stats.kendalltau(actual, away).statistic
            print(f"{name:<26}{protocol:<10}{len(actual):>6}{tau_in:>21.3f}{tau_away:>14.3f}"
                  f"{tau_away - tau_in:>+8.3f}")  # fmt: skip


def print_protocols(result: dict) -> None:
    """Per protocol: the seed-twin ceiling and the graph's gain with its 95% interval."""
    with_graph, without = "graph+curve+hparams", "curve+hparams"
    predictions = result["predictions"]
    print(f"{'protocol':<14}{'runs':>6}{'twin tau':>10}{'tau with graph':>16}{'without':>9}"
          f"{'gain':>8}{'95% interval':>18}")  # fmt: skip
    for protocol, runs in result["scored"].items():
        twins = seed_twin_agreement(runs["group"], runs["seed"], runs["actual"])["kendall_tau"]
        line = f"{protocol:<14}{len(runs['actual']):>6}{twins:>10.3f}"
        if with_graph in predictions and without in predictions:
            a, b = predictions[with_graph][protocol], predictions[without][protocol]
            g = graph_gain(runs["actual"], runs["group"], a, b)
            tau_a = result["rows"][with_graph][protocol]["all"]["kendall_tau"]
            tau_b = result["rows"][without][protocol]["all"]["kendall_tau"]
            line += f"{tau_a:>16.3f}{tau_b:>9.3f}{g['gain']:>+8.3f}"
            line += f"   [{g['low']:+.3f}, {g['high']:+.3f}]"
        print(line)


def save_combined_model(records, cfg, folder: Path) -> tuple[str, dict]:
    """One fit of the k=3 graph+curve+hparams model as an MLflow model, and one row of its input.

    MLflow's catboost flavour saves one CatBoost model: one fit (``ensemble=1``), the first fit
    of the predictor's ensemble.
    """
    dataset = build_dataset(records, 3, "graph+curve+hparams")
    columns = columns_of(dataset.feature_columns, "graph+curve+hparams")
    one_fit = OmegaConf.merge(cfg, {"ensemble": 1})
    (model,) = fit(dataset.matrix(columns), dataset.column(TARGET), one_fit).members
    x = dataset.matrix(model.feature_names_)
    path = folder / "model"
    mlflow.catboost.save_model(
        model, str(path), signature=infer_signature(x, model.predict(x)), input_example=x.head(1)
    )
    return str(path), x.iloc[0].to_dict()


def timings_ms(call, repeats: int) -> dict[str, float]:
    """Median and 99th percentile of ``repeats`` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    return {"median_ms": float(np.median(times)), "p99_ms": float(np.percentile(times, 99))}


def latency(model_path: str, row: dict, repeats: int) -> dict:
    """Endpoint round trips (keep-alive, loopback) and in-process pyfunc predictions."""
    port = free_port()
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    arguments = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_path,
                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    body = request_body(pd.DataFrame([row]))
    headers = {"Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}"
    with running_server(arguments, f"{url}/ping", Path(model_path).parent / "serve.log", env):
        session = requests.Session()
        for _ in range(20):  # warm-up
            session.post(f"{url}/invocations", data=body, headers=headers).raise_for_status()
        endpoint = timings_ms(
            lambda: session.post(f"{url}/invocations", data=body, headers=headers), repeats
        )
    loaded = mlflow.pyfunc.load_model(model_path)
    frame = pd.DataFrame([row])
    loaded.predict(frame)
    return {"endpoint": endpoint, "in_process": timings_ms(lambda: loaded.predict(frame), repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=compose_config([]).tracking.uri)
    parser.add_argument("--experiment", default="population")
    parser.add_argument(
        "--outside", default="offgrid", help="a sweep off the population's grid ('' for none)"
    )
    parser.add_argument(
        "--ks", type=int, nargs="*", default=[1, 2, 3, 5], help="none: latency only"
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--sets", nargs="*", default=SETS, help="feature sets to score")
    parser.add_argument("--requests", type=int, default=200, help="0: no latency")
    parser.add_argument("overrides", nargs="*", help="conf/predictor.yaml overrides: ensemble=1")
    args = parser.parse_args()
    cfg = compose_config(args.overrides, name="predictor")
    mlflow.set_tracking_uri(args.tracking_uri)
    start = time.perf_counter()
    records = load_runs(MlflowClient(), args.experiment)
    read_s = time.perf_counter() - start
    print(f"{len(records)} finished runs of {args.experiment!r} read in {read_s:.1f} s")
    print(f"CatBoost settings (conf/predictor.yaml): {dict(cfg.catboost)}")
    finished = [r for r in records if TARGET in r.metrics]
    accuracy = np.array([r.metrics[TARGET] for r in finished])
    learned = accuracy > NONTRIVIAL
    quartiles = np.round(np.quantile(accuracy, [0.25, 0.5, 0.75]), 3).tolist()
    print(f"final accuracy: {learned.mean():.0%} of runs above {NONTRIVIAL}; quartiles {quartiles}")
    twins = {}
    for subset, keep in (("all", np.ones_like(learned)), ("nontrivial", learned)):
        chosen = [run for run, kept in zip(finished, keep, strict=True) if kept]
        twins[subset] = seed_twin_agreement(
            [r.group for r in chosen], [r.params.get("seed") for r in chosen], accuracy[keep]
        )
    print(f"noise ceiling, seed-twin Kendall tau: {json.dumps(twins)}")
    outside = load_runs(MlflowClient(), args.outside) if args.outside else []
    if outside:
        print(f"{len(outside)} finished runs of {args.outside!r}, scored by models fitted on "
              "the whole population ('outside')")  # fmt: skip
    results = {}
    for k in args.ks:
        results[k] = evaluate_k(records, k, cfg, args.folds, outside, args.sets)
        print_k(k, results[k])
        print_gaps(results[k])
        print_same_runs(results[k])
        print_protocols(results[k])
    speed = {}
    if args.requests:
        with tempfile.TemporaryDirectory() as tmp:
            model_path, row = save_combined_model(records, cfg, Path(tmp))
            speed = latency(model_path, row, args.requests)
        endpoint, local = speed["endpoint"], speed["in_process"]
        print(
            f"\nlatency of {args.requests} single-row predictions, k=3 graph+curve+hparams model "
            f"({len(row)} features): endpoint median {endpoint['median_ms']:.2f} ms, p99 "
            f"{endpoint['p99_ms']:.2f} ms; in-process median {local['median_ms']:.2f} ms, p99 "
            f"{local['p99_ms']:.2f} ms"
        )
    quality = {str(k): v["rows"] for k, v in results.items()}
    summary = {"runs": len(records), "noise_ceiling": twins, "latency": speed, "quality": quality}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
