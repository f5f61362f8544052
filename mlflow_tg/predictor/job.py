"""Fit, evaluate and register the performance predictor: ``python -m mlflow_tg.predictor``.

From the finished runs of ``source_experiment``: one feature row per run (``dataset.py``),
target = final ``test_acc``. Every set of ``compare_sets`` is fitted on the runs of the
training configurations outside a fixed held-out share and scored on the held-out ones, and
fitted on the narrower half of the widths and scored on the wider half (width transfer), next
to the baseline a sweep would use anyway: ranking runs by ``val_acc`` at epoch k. The set
``feature_sets`` is also fitted at every other window of ``ks``; the models of all windows are
logged as one pyfunc model that answers runs (``model.py``), registered as a new version (tagged
with its windows and split), and made ``champion`` when it beats the current champion at window
k on the runs held out from both fits (else ``challenger``). Everything lands in one MLflow run
of the ``tracking.experiment`` experiment.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import mlflow
import numpy as np
import pandas as pd
import polars as pl
from mlflow import MlflowClient
from omegaconf import DictConfig
from scipy.stats import kendalltau

from mlflow_tg import keys
from mlflow_tg.config import CONF_DIR, is_whole_number
from mlflow_tg.config.checks import check_tracking_uri
from mlflow_tg.errors import ConfigError, Refusal
from mlflow_tg.predictor.answering import fitted_window, model_input, quantiles_of
from mlflow_tg.predictor.calibrate import outside_widening, widening
from mlflow_tg.predictor.dataset import Dataset, build_dataset
from mlflow_tg.predictor.evaluate import (
    QUALITY_METRICS,
    SELECT_ON,
    Comparison,
    compare,
    metric_key,
)
from mlflow_tg.predictor.features import (
    columns_of,
    hparam_features,
    metric_reads,
    parse_sets,
    set_name,
    set_of,
)
from mlflow_tg.predictor.figures import importance_figure, predicted_vs_actual_figure
from mlflow_tg.predictor.fit import fit, predict_interval
from mlflow_tg.predictor.model import RunPredictor
from mlflow_tg.predictor.promote import versus_champion
from mlflow_tg.predictor.registry import (
    FeatureSpec,
    Holdout,
    RegistryError,
    log_and_register,
    settle_aliases,
    version_by_alias,
)
from mlflow_tg.tracking.health import refused_access
from mlflow_tg.tracking.run import connect, use_experiment
from mlflow_tg.tracking.runs import TARGET, RunNotFoundError, RunRecord, load_runs
from mlflow_tg.tracking.sqlite import missing_store

log = logging.getLogger(__name__)
SELECTION_METRICS = ("kendall_tau", "spearman", "r2")
AUTO = "auto"  # feature_sets: register the compared set that ranks held-out runs best


MIN_RUNS = 8
MIN_SIDE = 3  # held-out runs, and fitting runs, below which a model cannot be fitted and checked


def check_predictor_config(cfg: DictConfig) -> None:
    """Reject values that would fail after minutes of reading runs."""
    check_tracking_uri(str(cfg.tracking.uri))
    if not is_whole_number(cfg.k) or cfg.k < 0:
        raise ConfigError(
            f"k={cfg.k!r} is not allowed: k must be a whole number ≥ 0 (epochs 0..k)."
        )
    ks = list(cfg.ks)
    if not ks or any(not is_whole_number(k) or k < 0 for k in ks) or cfg.k not in ks:
        raise ConfigError(
            f"ks={ks!r} is not allowed with k={cfg.k}: ks lists the windows the registered "
            "model answers from (whole numbers ≥ 0, for example [1, 2, 3]) and must include "
            "k, the window of the quality and champion comparisons."
        )
    try:
        quantiles_of(cfg.catboost.loss_function)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not cfg.compare_sets:
        raise ConfigError(
            "compare_sets=[] is not allowed: list at least one feature set to compare (for "
            "example [curve+hparams, graph+curve+hparams])."
        )
    for sets in [cfg.feature_sets, *cfg.compare_sets]:
        if sets == AUTO:
            continue
        try:
            parse_sets(sets)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if not is_whole_number(cfg.max_features) or cfg.max_features < 0:
        raise ConfigError(
            f"max_features={cfg.max_features!r} is not allowed: it must be a whole number ≥ 1, "
            "or 0 to keep every feature."
        )
    if not is_whole_number(cfg.ensemble) or cfg.ensemble < 1:
        raise ConfigError(
            f"ensemble={cfg.ensemble!r} is not allowed: it is the number of fits averaged, a "
            "whole number ≥ 1 (1: a single fit)."
        )
    if not 0 < cfg.holdout_fraction < 1:
        raise ConfigError(
            f"holdout_fraction={cfg.holdout_fraction!r} is not allowed: it must lie strictly "
            "between 0 and 1 (for example 0.25)."
        )
    if cfg.select_on not in SELECT_ON:
        raise ConfigError(
            f"select_on={cfg.select_on!r} is not allowed: choose one of {list(SELECT_ON)} "
            "(held-out configurations only, or the lower of that and the width-transfer score)."
        )
    if cfg.selection_metric not in SELECTION_METRICS:
        raise ConfigError(
            f"selection_metric={cfg.selection_metric!r} is not allowed: choose one of "
            f"{list(SELECTION_METRICS)}."
        )


def requested_sets(cfg: DictConfig) -> list[str]:
    """The set ``feature_sets`` asks for; none when it is ``auto`` (the best compared set)."""
    return [] if cfg.feature_sets == AUTO else [set_name(cfg.feature_sets)]


def compared_sets(cfg: DictConfig) -> list[str]:
    """The canonical names of the compared sets, the requested one included."""
    return list(dict.fromkeys([*(set_name(s) for s in cfg.compare_sets), *requested_sets(cfg)]))


def dataset_sets(compared: list[str]) -> str:
    """Every set the compared ones use, and ``curve``: the baseline ``val_acc@k`` is in it."""
    return set_name({"curve", *(name for sets in compared for name in parse_sets(sets))})


def fit_predictor(cfg: DictConfig) -> dict[str, Any]:
    """The whole job; returns the quality table, the new version and the alias it got."""
    check_predictor_config(cfg)
    uri = connect(cfg.tracking)
    if (missing := missing_store(uri)) is not None:  # MLflow would create an empty one
        raise RunNotFoundError(
            f"experiment {cfg.source_experiment!r} is not in the tracking store {uri}: "
            f"{missing} does not exist. Train the runs first (make population), or point "
            "tracking.uri at the store that holds them."
        )
    client = MlflowClient()
    records = load_runs(client, cfg.source_experiment)
    compared = compared_sets(cfg)
    dataset = build_dataset(records, cfg.k, dataset_sets(compared))
    holdout = Holdout(cfg.holdout_fraction, cfg.seed).rows(dataset.groups)
    if dataset.frame.height < MIN_RUNS or min(holdout.sum(), (~holdout).sum()) < MIN_SIDE:
        raise RunNotFoundError(
            f"experiment {cfg.source_experiment!r} has {dataset.frame.height} usable runs "
            f"({int(holdout.sum())} held out), too few to fit and evaluate a predictor (at least "
            f"{MIN_RUNS}, {MIN_SIDE} on each side); left out: {dataset.left_out or 'none'}."
        )
    use_experiment(cfg.tracking)  # the predictor's own experiment, once there is a fit to log
    comparison = compare(dataset, cfg, holdout, compared, next(iter(requested_sets(cfg)), None))
    log.info("%d runs, %d held out; left out: %s", dataset.frame.height, int(holdout.sum()),
             dataset.left_out or "none")  # fmt: skip
    log.info("width transfer: %s", comparison.transfer)
    log.info("registered feature set: %s, %s", comparison.registered, comparison.choice)
    with pl.Config(tbl_rows=100, tbl_cols=12, float_precision=3):
        log.info("\n%s", comparison.table)
    predictor, coverage = fit_windows(cfg, records, dataset, holdout, comparison)
    log.info("held-out coverage of the %g interval by window: %s", predictor.nominal, coverage)
    outcome = log_predictor_run(
        client, cfg, dataset, holdout, comparison, records, (predictor, coverage)
    )
    return outcome | {"quality": comparison.table, "coverage": coverage}


def fit_windows(
    cfg: DictConfig,
    records: list[RunRecord],
    dataset: Dataset,
    holdout: np.ndarray,
    comparison: Comparison,
) -> tuple[RunPredictor, dict[int, float]]:
    """The registered set's model at every window of ``ks``, and each one's held-out coverage.

    Window k's model is the comparison's; the others are fitted the same way (without the
    held-out configurations) on the runs that have their epochs, choosing among the summaries
    of the metrics window k reads: the request then names those metrics only (MLflow's scoring
    server casts and checks every column the signature declares, about 80 µs per column and
    request). Each interval is calibrated on
    the training runs (``calibrate.py``); coverage: the share of held-out runs whose final
    accuracy lies inside their interval (nominal: ``predictor.nominal``).
    """
    registered, split = comparison.registered, Holdout(cfg.holdout_fraction, cfg.seed)
    quantiles = quantiles_of(cfg.catboost.loss_function)
    nominal = quantiles[2] - quantiles[0]
    by_id = {run.run_id: run for run in records}
    windows, models, coverage = [], {}, {}
    shared = metrics_of(comparison.model.feature_names_, cfg.k)
    for k in sorted(set(cfg.ks)):
        data, held, model = dataset, holdout, comparison.model
        if k != cfg.k:
            data = build_dataset(records, k, registered)
            held = split.rows(data.groups)
            if min(held.sum(), (~held).sum()) < MIN_SIDE:
                raise RunNotFoundError(
                    f"window k={k} of ks has {data.frame.height} usable runs ({int(held.sum())} "
                    f"held out), too few to fit and check a model ({MIN_SIDE} on each side); "
                    f"left out: {data.left_out or 'none'}. Drop it from ks."
                )
            columns = [
                column
                for column in columns_of(data.feature_columns, registered)
                if set_of(column) == "hparams" or metric_reads(column, k)[0] in shared
            ]
            model = fit(data.matrix(columns, ~held), data.column(TARGET, ~held), cfg)
        trained = pd.DataFrame([hparam_features(by_id[i].params) for i in data.run_ids(~held)])
        x = data.matrix(model.feature_names_, ~held)
        groups = [group for group, out in zip(data.groups, held, strict=True) if not out]
        y = data.column(TARGET, ~held)
        widen = widening(model, x, y, groups, cfg, nominal)
        outside = max(widen, outside_widening(model, x, y, trained, cfg, nominal))
        window = fitted_window(k, model, x, trained, widen, groups, outside)
        windows.append(window)
        models[k] = model
        shown = data.matrix(model.feature_names_, held)
        flagged = window.flags(shown, [by_id[i].params for i in data.run_ids(held)])
        low, point, high = predict_interval(model, shown, window.widening(flagged)).T
        actual = data.column(TARGET, held)
        coverage[k] = float(np.mean((low <= actual) & (actual <= high)))
        tau = kendalltau(point, actual).statistic
        log.info("window k=%d (%d metrics): interval widened by %.4f (%.4f out of distribution), "
                 "held-out coverage %.3f (nominal %g), Kendall tau %.3f", k,
                 len(metrics_of(model.feature_names_, k)), widen, window.widen_outside,
                 coverage[k], nominal, tau)  # fmt: skip
    return RunPredictor(windows, quantiles, models), coverage


def metrics_of(columns: list[str], k: int) -> set[str]:
    """The metrics that graph and curve columns of window ``k`` are built from."""
    return {metric_reads(column, k)[0] for column in columns if set_of(column) != "hparams"}


def input_example(predictor: RunPredictor, records: list[RunRecord], run_ids: list[str]):
    """Request rows of the first training run the predictor answers, epochs 0..max(ks)."""
    by_id = {run.run_id: run for run in records}
    for run_id in run_ids:
        run = by_id[run_id]
        rows = [row for row in run.history if row[keys.EPOCH] <= predictor.ks[-1]]
        example = model_input(rows, run.params, run_id)
        try:
            predictor.answer(example)
            return example
        except Refusal:
            continue
    raise RunNotFoundError("the predictor answers none of its training runs: nothing to show")


def log_predictor_run(
    client: MlflowClient,
    cfg: DictConfig,
    dataset: Dataset,
    holdout: np.ndarray,
    comparison: Comparison,
    records: list[RunRecord],
    fitted: tuple[RunPredictor, dict[int, float]],
) -> dict[str, Any]:
    """The predictor's MLflow run: model first (see registry), then comparison and metrics."""
    wanted, (predictor, coverage) = comparison.registered, fitted
    champion = version_by_alias(client, cfg.registered_model, keys.CHAMPION)  # before registering
    with mlflow.start_run(run_name=f"predictor-k{cfg.k}-{wanted}") as run:
        mlflow.log_params(predictor_params(cfg, dataset, holdout, wanted))
        example = input_example(predictor, records, dataset.run_ids(~holdout))
        split = Holdout(cfg.holdout_fraction, cfg.seed)
        spec = FeatureSpec(cfg.k, wanted, split, tuple(predictor.ks))
        start = time.perf_counter()
        version = log_and_register(predictor, example, cfg.registered_model, spec)
        registration_s = time.perf_counter() - start
        wins, scores, verdict = versus_champion(
            cfg, champion, dataset, holdout, comparison.predictions, records
        )
        alias, unpromoted = settle_aliases(client, cfg.registered_model, version, wins, champion)
        verdict += unpromoted
        mlflow.set_tags(
            {
                keys.MODEL_VERSION: version.version,
                keys.ALIAS: alias,
                keys.COMPARISON: verdict,
                keys.WIDTH_TRANSFER: comparison.transfer,
                keys.SETS_CHOICE: comparison.choice,
            }
        )
        mlflow.log_metrics(
            scores
            | {keys.coverage_metric(predictor.nominal): coverage[cfg.k]}
            | {keys.coverage_metric(predictor.nominal, k): value for k, value in coverage.items()}
            | {keys.widening_metric(k): w.widen for k, w in predictor.windows.items()}
            | {
                keys.widening_metric(k, outside=True): w.widen_outside
                for k, w in predictor.windows.items()
            }
        )
        mlflow.log_metrics(
            {
                metric_key(row, metric): row[metric]
                for row in comparison.table.to_dicts()
                for metric in QUALITY_METRICS
                if np.isfinite(row[metric])
            }
        )
        log_artifacts(dataset, holdout, comparison, wanted, cfg.k)
    log.info("%s version %s is %s (%s); logging and registering it took %.1f s",
             cfg.registered_model, version.version, alias, verdict, registration_s)  # fmt: skip
    return {
        "run_id": run.info.run_id,
        "version": version.version,
        "alias": alias,
        "verdict": verdict,
        "registration_s": registration_s,
    }


def predictor_params(cfg: DictConfig, dataset: Dataset, holdout: np.ndarray, wanted: str) -> dict:
    """What the predictor run was fitted on and how."""
    return {
        "k": cfg.k,
        "ks": ",".join(map(str, sorted(set(cfg.ks)))),
        "feature_sets": wanted,
        "feature_sets.requested": cfg.feature_sets,
        "seed": cfg.seed,
        "source_experiment": cfg.source_experiment,
        "runs": dataset.frame.height,
        "holdout_runs": int(holdout.sum()),
        "holdout_fraction": cfg.holdout_fraction,
        "selection_metric": cfg.selection_metric,
        "max_features": cfg.max_features,
        "ensemble": cfg.ensemble,
        **{f"catboost.{key}": value for key, value in cfg.catboost.items()},
        **{f"left_out.{reason}": count for reason, count in dataset.left_out.items()},
    }


def log_artifacts(
    dataset: Dataset, holdout: np.ndarray, comparison: Comparison, wanted: str, k: int
) -> None:
    """Quality table, training table (also as a dataset input), scatter and importances."""
    model = comparison.model
    importance = pl.DataFrame(
        {"feature": model.feature_names_, "importance": model.get_feature_importance()}
    ).sort("importance", descending=True)
    tables = {
        keys.QUALITY_TABLE: comparison.table,
        keys.TRAINING_TABLE: dataset.frame.with_columns(pl.Series("held_out", holdout)),
        keys.IMPORTANCE_TABLE: importance,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, frame in tables.items():
            frame.write_parquet(Path(tmp) / f"{name}.parquet")
            mlflow.log_artifact(str(Path(tmp) / f"{name}.parquet"))
    training = mlflow.data.from_polars(
        tables[keys.TRAINING_TABLE], name=keys.TRAINING_DATASET, targets=TARGET
    )
    mlflow.log_input(training, context="training")
    predictions = {
        wanted: comparison.predictions,
        f"val_acc@{k} (baseline)": dataset.column(f"val_acc@{k}", holdout),
    }
    scatter = predicted_vs_actual_figure(dataset.column(TARGET, holdout), predictions)
    mlflow.log_figure(scatter, keys.SCATTER_FIGURE)
    mlflow.log_figure(importance_figure(importance.head(25)), keys.IMPORTANCE_FIGURE)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predictor")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    # one progress bar per run's history read would bury the job's own log (set it to see them)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        fit_predictor(cfg)
    except (ConfigError, RunNotFoundError, RegistryError) as error:
        log.error("%s", error)
        sys.exit(2)
    except Exception as error:
        if (refused := refused_access(error)) is None:
            raise
        log.error("%s: %s", mlflow.get_tracking_uri(), refused)
        sys.exit(2)
