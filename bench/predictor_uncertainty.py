"""Calibration of the predictor's 80% interval, by uncertainty method, on held-out runs.

    python bench/predictor_uncertainty.py [--tracking-uri sqlite:///mlflow.db] [k=3 ...]

Trailing arguments override ``conf/predictor.yaml``. For each of ``--seeds`` held-out splits
(``holdout_fraction`` of the training configurations, as the predictor job holds out), the
registered feature set is fitted the job's way (``fit``: column selection, then ``ensemble``
refits with ``catboost.loss_function``, MultiQuantile, averaged) and, on the columns it kept, by
the alternatives, each one fit (``ensemble=1`` sets the methods side by side, one fit each):

- ``multiquantile``: CatBoost ``MultiQuantile:alpha=0.1,0.5,0.9``, interval = the outer quantiles;
- ``rmse_uncertainty``: ``RMSEWithUncertainty``, mean ± 1.2816 σ (a Gaussian 80% interval);
- ``virtual_ensembles``: the same with ``posterior_sampling``, σ² = knowledge + data
  uncertainty of ``virtual_ensembles_predict`` (10 virtual models);
- ``multiquantile_conformal``: the quantiles widened by the 80% quantile of out-of-fold
  conformity scores on the training runs (conformalized quantile regression, 5 folds grouped by
  configuration): ``calibrate.py``, what the registered model does.

Prints coverage (share of held-out runs inside their interval; nominal 0.8), on all runs and on
the non-trivial ones, the mean interval width and Kendall τ of the point, averaged over splits.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
import polars as pl
from catboost import CatBoostRegressor
from mlflow import MlflowClient
from omegaconf import OmegaConf
from scipy import stats

from mlflow_tg.config import compose_config
from mlflow_tg.predictor.answering import quantiles_of, to_interval
from mlflow_tg.predictor.calibrate import widening
from mlflow_tg.predictor.dataset import build_dataset
from mlflow_tg.predictor.features import categorical_columns, columns_of, set_name
from mlflow_tg.predictor.fit import fit
from mlflow_tg.predictor.registry import Holdout
from mlflow_tg.tracking.runs import TARGET, load_runs

Z80 = 1.2815515655446004  # standard normal 0.9 quantile


def model(cfg, x, loss: str, **options) -> CatBoostRegressor:
    """CatBoost as the job configures it, with another loss."""
    settings = OmegaConf.to_container(cfg.catboost, resolve=True) | {"loss_function": loss}
    return CatBoostRegressor(
        **settings,
        **options,
        random_seed=cfg.seed,
        cat_features=categorical_columns(x.columns),
        verbose=False,
        allow_writing_files=False,
    )


def gaussian(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """(low, point, high) of a Gaussian 80% interval, clipped to [0, 1]."""
    spread = Z80 * np.sqrt(np.maximum(variance, 0))
    return to_interval(np.column_stack([mean - spread, mean, mean + spread]))


def intervals(cfg, data, held: np.ndarray, sets: str) -> dict[str, tuple[np.ndarray, float]]:
    """Each method's (low, point, high) for the held-out rows, and its fitting time."""
    columns = columns_of(data.feature_columns, sets)
    y = data.column(TARGET, ~held)
    start = time.perf_counter()
    chosen = fit(data.matrix(columns, ~held), y, cfg)
    selection_s = time.perf_counter() - start
    kept = list(chosen.feature_names_)
    x, test = data.matrix(kept, ~held), data.matrix(kept, held)
    loss = cfg.catboost.loss_function
    low_q, _, high_q = quantiles_of(loss)
    found = {"multiquantile": (to_interval(chosen.predict(test)), selection_s)}
    start = time.perf_counter()
    rmse = model(cfg, x, "RMSEWithUncertainty").fit(x, y)
    mean, variance = rmse.predict(test).T
    found["rmse_uncertainty"] = (gaussian(mean, variance), time.perf_counter() - start)
    start = time.perf_counter()
    sampled = model(cfg, x, "RMSEWithUncertainty", posterior_sampling=True).fit(x, y)
    mean, knowledge, noise = sampled.virtual_ensembles_predict(
        test, prediction_type="TotalUncertainty", virtual_ensembles_count=10
    ).T
    found["virtual_ensembles"] = (gaussian(mean, knowledge + noise), time.perf_counter() - start)
    start = time.perf_counter()
    groups = [g for g, out in zip(data.groups, held, strict=True) if not out]
    widen = widening(chosen, x, y, groups, cfg, high_q - low_q)
    calibrated = to_interval(chosen.predict(test), widen)
    found["multiquantile_conformal"] = (calibrated, time.perf_counter() - start)
    return found


def main() -> None:
    """Fit every method on each split and print the averaged table."""
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    cli.add_argument("--seeds", type=int, default=3, help="held-out splits (hash seeds 0..n-1)")
    cli.add_argument("overrides", nargs="*", help="conf/predictor.yaml overrides")
    args = cli.parse_args()
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    cfg = compose_config(args.overrides, name="predictor")
    sets = set_name(cfg.feature_sets)
    records = load_runs(MlflowClient(args.tracking_uri), cfg.source_experiment)
    data = build_dataset(records, cfg.k, sets)
    print(f"{data.frame.height} runs, k={cfg.k}, {sets}, {cfg.catboost.iterations} iterations")
    rows = []
    for seed in range(args.seeds):
        held = Holdout(cfg.holdout_fraction, seed).rows(data.groups)
        actual = data.column(TARGET, held)
        learned = actual > cfg.nontrivial_above
        for method, (interval, seconds) in intervals(cfg, data, held, sets).items():
            low, point, high = interval.T
            inside = (low <= actual) & (actual <= high)
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "held_out": len(actual),
                    "coverage": inside.mean(),
                    "coverage_nontrivial": inside[learned].mean() if learned.any() else np.nan,
                    "mean_width": (high - low).mean(),
                    "kendall_tau": stats.kendalltau(actual, point).statistic,
                    "fit_s": seconds,
                }
            )
            print(rows[-1])
    table = pl.DataFrame(rows).group_by("method", maintain_order=True).mean().drop("seed")
    with pl.Config(tbl_rows=20, tbl_cols=10, float_precision=3):
        print(table)


if __name__ == "__main__":
    main()
