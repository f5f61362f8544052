"""Fit, evaluate and register the performance predictor: ``python -m mlflow_tg.predictor``.

From the finished runs of ``source_experiment``: one feature row per run (``features.py``),
target = final ``test_acc``. Every set of ``compare_sets`` is fitted on the runs of the
training configurations outside a fixed held-out share and scored on the held-out ones, and
fitted on the narrower half of the widths and scored on the wider half (width transfer), next
to the baseline a sweep would use anyway: ranking runs by ``val_acc`` at epoch k. The model of
``feature_sets`` is logged, registered as a new version (tagged with its split), and made
``champion`` when it beats the current champion on the runs held out from both fits (else
``challenger``). Everything lands in one MLflow run of the ``tracking.experiment`` experiment.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import hydra
import mlflow
import numpy as np
import pandas as pd
import polars as pl
from catboost import CatBoostRegressor
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from omegaconf import DictConfig, OmegaConf

from mlflow_tg.config import CONF_DIR, ConfigError, is_whole_number
from mlflow_tg.evaluation import (
    QUALITY_METRICS,
    narrow_half,
    quality,
    quality_by_subset,
)
from mlflow_tg.features import (
    NotEnoughEpochsError,
    categorical_columns,
    columns_of,
    design_matrix,
    parse_sets,
    run_features,
    set_name,
)
from mlflow_tg.figures import importance_figure, predicted_vs_actual_figure
from mlflow_tg.registry import (
    CHAMPION,
    FeatureSpec,
    Holdout,
    RegistryError,
    log_and_register,
    settle_aliases,
    version_by_alias,
)
from mlflow_tg.runs import TARGET, RunNotFoundError, RunRecord, load_runs
from mlflow_tg.serving import predict_frame
from mlflow_tg.tracking import HISTORY_ARTIFACT, use_tracking

log = logging.getLogger(__name__)
# distinct from every feature name ("width" is a feature of the hparams set)
META_COLUMNS = ("run_id", "group", "seed", "run_width", TARGET)
SELECTION_METRICS = ("kendall_tau", "spearman", "r2")
MIN_RUNS = 8
MIN_COMPARED = 3  # held-out runs below which a comparison with the champion means nothing
BASELINE = "val_acc@k"


@dataclass
class Dataset:
    """One row per usable run: identifiers, the target, and the features of every set."""

    frame: pl.DataFrame
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def feature_columns(self) -> list[str]:
        """Every feature column, in table order."""
        return [column for column in self.frame.columns if column not in META_COLUMNS]

    @property
    def groups(self) -> list[str]:
        """Training configuration of each row."""
        return self.frame["group"].to_list() if self.frame.height else []

    def matrix(self, columns: list[str], rows: np.ndarray | None = None) -> pd.DataFrame:
        """Model input: numbers as float64, categories as strings."""
        frame = self.frame if rows is None else self.frame.filter(pl.Series(rows))
        return design_matrix(frame, columns)

    def column(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """One column (the target by default) of the (selected) runs."""
        values = self.frame[name].to_numpy()
        return values if rows is None else values[rows]

    def run_ids(self, rows: np.ndarray) -> list[str]:
        """The run ids of the selected rows."""
        return self.frame["run_id"].filter(pl.Series(rows)).to_list()


@dataclass
class Comparison:
    """Quality of each feature set (and the baseline), and the registered set's held-out fit."""

    quality: dict[str, dict[str, dict[str, dict[str, float]]]]  # set → split → subset → scores
    model: CatBoostRegressor  # of the registered set, fitted without the held-out configurations
    predictions: np.ndarray  # its predictions of the held-out runs
    transfer: str  # which widths the transfer split fits on and scores, or why there is none

    @cached_property
    def table(self) -> pl.DataFrame:
        """One row per feature set (or baseline), split and subset."""
        return pl.DataFrame(
            [
                {"features": sets, "split": split, "subset": subset} | scores
                for sets, splits in self.quality.items()
                for split, subsets in splits.items()
                for subset, scores in subsets.items()
            ]
        )


def build_dataset(records: list[RunRecord], k: int, sets: str) -> Dataset:
    """Feature rows of every run with a final accuracy and epochs 0..k."""
    rows, left_out = [], Counter()
    for run in records:
        if TARGET not in run.metrics:
            left_out[f"no {TARGET}"] += 1
            continue
        if run.history is None:
            left_out[f"no {HISTORY_ARTIFACT}"] += 1
            continue
        try:
            features = run_features(run.history, run.params, k, sets, run.run_id)
        except NotEnoughEpochsError:
            left_out[f"fewer than {k + 1} epochs or no graph summaries"] += 1
            continue
        meta = {
            "run_id": run.run_id,
            "group": run.group,
            "seed": run.params.get("seed", ""),
            "run_width": float(run.params.get("width", "nan")),
            TARGET: run.metrics[TARGET],
        }
        rows.append(meta | features)
    frame = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()
    return Dataset(frame, dict(left_out))


def catboost(x: pd.DataFrame, y: np.ndarray, cfg: DictConfig) -> CatBoostRegressor:
    """A CatBoost regressor on the features; model, optimizer etc. as native categories."""
    model = CatBoostRegressor(
        **OmegaConf.to_container(cfg.catboost, resolve=True),
        random_seed=cfg.seed,
        cat_features=categorical_columns(x.columns),
        verbose=False,
        allow_writing_files=False,
    )
    return model.fit(x, y)


def fit(x: pd.DataFrame, y: np.ndarray, cfg: DictConfig) -> CatBoostRegressor:
    """CatBoost on the ``max_features`` most important columns of a first fit on all of them.

    Serving cost grows with the columns (MLflow's scoring server casts and checks each one;
    CatBoost converts each): one prediction through ``mlflow models serve`` took 128 ms with
    all 886 columns, 11 ms with 64 and 7 ms with 32, while held-out quality stayed level.
    Selection happens inside the fit, so evaluations include it.
    """
    model = catboost(x, y, cfg)
    if cfg.max_features and x.shape[1] > cfg.max_features:
        ranked = np.argsort(-model.get_feature_importance(), kind="stable")
        model = catboost(x.iloc[:, np.sort(ranked[: cfg.max_features])], y, cfg)
    return model


def predict(model: CatBoostRegressor, x: pd.DataFrame) -> np.ndarray:
    """Predictions from the columns the model kept (CatBoost reads columns by position)."""
    return model.predict(x[model.feature_names_])


def fit_and_score(
    dataset: Dataset, columns: list[str], train: np.ndarray, cfg: DictConfig
) -> tuple[CatBoostRegressor, np.ndarray]:
    """Fit on the ``train`` rows, predict the others."""
    model = fit(dataset.matrix(columns, train), dataset.column(TARGET, train), cfg)
    return model, predict(model, dataset.matrix(columns, ~train))


def transfer_split(widths: list[float]) -> tuple[np.ndarray, str]:
    """The narrow-width rows to fit on, and the split in words ('not available: …' if none)."""
    narrow = narrow_half(widths)
    distinct = sorted(set(widths))
    if not narrow.any():  # one width: no narrower half to fit on
        return narrow, f"not available: it needs 2 distinct widths, the runs have {distinct}"
    fitted = sorted({width for width, kept in zip(widths, narrow, strict=True) if kept})
    return narrow, f"fitted on widths {fitted}, scored on the wider ones"


def compare(
    dataset: Dataset, cfg: DictConfig, holdout: np.ndarray, compared: list[str], registered: str
) -> Comparison:
    """Held-out and width-transfer quality of each set, and of ranking by ``val_acc@k``."""
    narrow, transfer = transfer_split(dataset.frame["run_width"].to_list())
    wide = ~narrow if narrow.any() else narrow  # no transfer: no rows, NaN scores
    y = dataset.column(TARGET)

    def scored(predicted_holdout, predicted_wide) -> dict[str, dict[str, dict[str, float]]]:
        return {
            "holdout": quality_by_subset(y[holdout], predicted_holdout, cfg.nontrivial_above),
            "transfer": quality_by_subset(y[wide], predicted_wide, cfg.nontrivial_above),
        }

    qualities, registered_fit = {}, None
    for sets in compared:
        columns = columns_of(dataset.feature_columns, sets)
        model, predicted = fit_and_score(dataset, columns, ~holdout, cfg)
        transferred = fit_and_score(dataset, columns, narrow, cfg)[1] if wide.any() else y[wide]
        qualities[sets] = scored(predicted, transferred)
        if sets == registered:
            registered_fit = model, predicted
    baseline = dataset.column(f"val_acc@{cfg.k}")
    qualities[BASELINE] = scored(baseline[holdout], baseline[wide])
    return Comparison(qualities, *registered_fit, transfer)


def metric_key(row: dict[str, Any], metric: str) -> str:
    """``holdout/graph_curve_hparams/all/kendall_tau`` ('+' and '@' are not allowed in keys)."""
    features = row["features"].replace("+", "_").replace("@", "_at_")
    return f"{row['split']}/{features}/{row['subset']}/{metric}"


def champion_predictions(
    name: str, champion: ModelVersion, spec: FeatureSpec, records: list[RunRecord]
) -> dict[str, float]:
    """The champion's predictions for ``records`` by run id, from its own features."""
    dataset = build_dataset(records, spec.k, spec.sets)
    if not dataset.frame.height:
        return {}
    predicted = predict_frame(f"models:/{name}/{champion.version}", dataset.frame)
    return dict(zip(dataset.frame["run_id"], predicted, strict=True))


def shared_holdout(
    dataset: Dataset, holdout: np.ndarray, current: Holdout, spec: FeatureSpec, version: str
) -> tuple[set[str], str]:
    """Run ids held out under both this fit's split and the champion's, and the two in words.

    The champion's split is in its tags; a version registered without them is assumed to have
    used this fit's.
    """
    theirs = spec.holdout or current
    words = f"this fit's split ({current}) and champion v{version}'s " + (
        f"({theirs})" if spec.holdout else "(assumed the same: the version has no holdout tags)"
    )
    return set(dataset.run_ids(holdout & theirs.rows(dataset.groups))), words


def versus_champion(
    cfg: DictConfig,
    champion: ModelVersion | None,
    dataset: Dataset,
    holdout: np.ndarray,
    candidate: np.ndarray,
    records: list[RunRecord],
) -> tuple[bool, dict[str, float], str]:
    """Whether the new version beats the champion on runs held out from both fits.

    ``candidate`` predicts the ``holdout`` rows. The champion was fitted without its own split,
    which differs from this one when the seed or the fraction changed since.
    """
    if champion is None:
        return True, {}, "first version: no champion yet"
    try:
        spec = FeatureSpec.of_version(champion)
        current = Holdout(cfg.holdout_fraction, cfg.seed)
        shared, split = shared_holdout(dataset, holdout, current, spec, champion.version)
        held = [run for run in records if run.run_id in shared]
        incumbent = (
            champion_predictions(cfg.registered_model, champion, spec, held)
            if len(shared) >= MIN_COMPARED
            else {}
        )
    except Exception as error:  # a version that cannot be loaded cannot serve either
        log.warning("champion v%s cannot score runs: %s", champion.version, error)
        verdict = (
            f"champion v{champion.version} cannot be used ({type(error).__name__}: {error}); a "
            "champion that cannot be loaded cannot serve either, so the new version replaces it"
        )
        return True, {}, verdict
    ids = dataset.run_ids(holdout)
    predicted = dict(zip(ids, candidate, strict=True))
    actual = dict(zip(ids, dataset.column(TARGET, holdout), strict=True))
    return score_against(cfg, champion.version, predicted, incumbent, actual, split)


def score_against(
    cfg: DictConfig,
    version: str,
    candidate: dict[str, float],
    incumbent: dict[str, float],
    actual: dict[str, float],
    split: str,
) -> tuple[bool, dict[str, float], str]:
    """Compare both models' predictions, by run id, on the runs both scored."""
    common = sorted(set(candidate) & set(incumbent))
    if len(common) < MIN_COMPARED:
        verdict = (
            f"not compared: only {len(common)} runs held out under both {split} can be scored "
            f"by both (at least {MIN_COMPARED} needed); the champion stays"
        )
        return False, {"runs": float(len(common))}, verdict
    y = np.array([actual[run] for run in common])
    new = quality(y, np.array([candidate[run] for run in common]))[cfg.selection_metric]
    old = quality(y, np.array([incumbent[run] for run in common]))[cfg.selection_metric]
    scores = {"candidate": new, "champion": old, "runs": float(len(common))}
    verdict = (
        f"{cfg.selection_metric} {new:.4f} vs champion v{version} {old:.4f} on the "
        f"{len(common)} runs held out under both {split}"
    )
    # NaN (constant predictions have no rank correlation) counts as the worst score
    wins = np.nan_to_num(new, nan=-np.inf) > np.nan_to_num(old, nan=-np.inf)
    return bool(wins), scores, verdict


def check_predictor_config(cfg: DictConfig) -> None:
    """Reject values that would fail after minutes of reading runs."""
    if not is_whole_number(cfg.k) or cfg.k < 0:
        raise ConfigError(
            f"k={cfg.k!r} is not allowed: k must be a whole number ≥ 0 (epochs 0..k)."
        )
    for sets in [cfg.feature_sets, *cfg.compare_sets]:
        try:
            parse_sets(sets)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if not is_whole_number(cfg.max_features) or cfg.max_features < 0:
        raise ConfigError(
            f"max_features={cfg.max_features!r} is not allowed: it must be a whole number ≥ 1, "
            "or 0 to keep every feature."
        )
    if not 0 < cfg.holdout_fraction < 1:
        raise ConfigError(
            f"holdout_fraction={cfg.holdout_fraction!r} is not allowed: it must lie strictly "
            "between 0 and 1 (for example 0.25)."
        )
    if cfg.selection_metric not in SELECTION_METRICS:
        raise ConfigError(
            f"selection_metric={cfg.selection_metric!r} is not allowed: choose one of "
            f"{list(SELECTION_METRICS)}."
        )


def compared_sets(cfg: DictConfig) -> list[str]:
    """The canonical names of the compared sets, the registered one included."""
    return list(dict.fromkeys(set_name(sets) for sets in [*cfg.compare_sets, cfg.feature_sets]))


def dataset_sets(compared: list[str]) -> str:
    """Every set the compared ones use, and ``curve``: the baseline ``val_acc@k`` is in it."""
    return set_name({"curve", *(name for sets in compared for name in parse_sets(sets))})


def fit_predictor(cfg: DictConfig) -> dict[str, Any]:
    """The whole job; returns the quality table, the new version and the alias it got."""
    check_predictor_config(cfg)
    use_tracking(cfg.tracking)
    client = MlflowClient()
    records = load_runs(client, cfg.source_experiment)
    compared, registered = compared_sets(cfg), set_name(cfg.feature_sets)
    dataset = build_dataset(records, cfg.k, dataset_sets(compared))
    holdout = Holdout(cfg.holdout_fraction, cfg.seed).rows(dataset.groups)
    if dataset.frame.height < MIN_RUNS or min(holdout.sum(), (~holdout).sum()) < 3:
        raise RunNotFoundError(
            f"experiment {cfg.source_experiment!r} has {dataset.frame.height} usable runs "
            f"({int(holdout.sum())} held out), too few to fit and evaluate a predictor (at least "
            f"{MIN_RUNS}, 3 on each side); left out: {dataset.left_out or 'none'}."
        )
    comparison = compare(dataset, cfg, holdout, compared, registered)
    log.info("%d runs, %d held out; left out: %s", dataset.frame.height, int(holdout.sum()),
             dataset.left_out or "none")  # fmt: skip
    log.info("width transfer: %s", comparison.transfer)
    with pl.Config(tbl_rows=100, tbl_cols=12, float_precision=3):
        log.info("\n%s", comparison.table)
    outcome = log_predictor_run(client, cfg, dataset, holdout, comparison, records)
    return outcome | {"quality": comparison.table}


def log_predictor_run(
    client: MlflowClient,
    cfg: DictConfig,
    dataset: Dataset,
    holdout: np.ndarray,
    comparison: Comparison,
    records: list[RunRecord],
) -> dict[str, Any]:
    """The predictor's MLflow run: model first (see registry), then comparison and metrics."""
    wanted = set_name(cfg.feature_sets)
    champion = version_by_alias(client, cfg.registered_model, CHAMPION)  # before registering
    with mlflow.start_run(run_name=f"predictor-k{cfg.k}-{wanted}") as run:
        mlflow.log_params(predictor_params(cfg, dataset, holdout, wanted))
        model = comparison.model
        example = dataset.matrix(model.feature_names_, ~holdout).head(50)  # its columns only
        spec = FeatureSpec(cfg.k, wanted, Holdout(cfg.holdout_fraction, cfg.seed))
        version = log_and_register(model, example, cfg.registered_model, spec)
        wins, scores, verdict = versus_champion(
            cfg, champion, dataset, holdout, comparison.predictions, records
        )
        alias = settle_aliases(client, cfg.registered_model, version, wins)
        mlflow.set_tags(
            {
                "mlflow_tg.model_version": version.version,
                "mlflow_tg.alias": alias,
                "mlflow_tg.comparison": verdict,
                "mlflow_tg.width_transfer": comparison.transfer,
            }
        )
        mlflow.log_metrics({f"comparison/{key}": value for key, value in scores.items()})
        mlflow.log_metrics(
            {
                metric_key(row, metric): row[metric]
                for row in comparison.table.to_dicts()
                for metric in QUALITY_METRICS
                if np.isfinite(row[metric])
            }
        )
        log_artifacts(dataset, holdout, comparison, wanted, cfg.k)
    log.info("%s version %s is %s (%s)", cfg.registered_model, version.version, alias, verdict)
    return {
        "run_id": run.info.run_id,
        "version": version.version,
        "alias": alias,
        "verdict": verdict,
    }


def predictor_params(cfg: DictConfig, dataset: Dataset, holdout: np.ndarray, wanted: str) -> dict:
    """What the predictor run was fitted on and how."""
    return {
        "k": cfg.k,
        "feature_sets": wanted,
        "seed": cfg.seed,
        "source_experiment": cfg.source_experiment,
        "runs": dataset.frame.height,
        "holdout_runs": int(holdout.sum()),
        "holdout_fraction": cfg.holdout_fraction,
        "selection_metric": cfg.selection_metric,
        "max_features": cfg.max_features,
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
        "quality": comparison.table,
        "training_table": dataset.frame.with_columns(pl.Series("held_out", holdout)),
        "feature_importance": importance,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, frame in tables.items():
            frame.write_parquet(Path(tmp) / f"{name}.parquet")
            mlflow.log_artifact(str(Path(tmp) / f"{name}.parquet"))
    training = mlflow.data.from_polars(
        tables["training_table"], name="predictor-training-table", targets=TARGET
    )
    mlflow.log_input(training, context="training")
    predictions = {
        wanted: comparison.predictions,
        f"val_acc@{k} (baseline)": dataset.column(f"val_acc@{k}", holdout),
    }
    scatter = predicted_vs_actual_figure(dataset.column(TARGET, holdout), predictions)
    mlflow.log_figure(scatter, "predicted_vs_actual.png")
    mlflow.log_figure(importance_figure(importance.head(25)), "feature_importance.png")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predictor")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    try:
        fit_predictor(cfg)
    except (ConfigError, RunNotFoundError, RegistryError) as error:
        log.error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
