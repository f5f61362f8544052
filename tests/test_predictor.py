"""The predictor on a small real population: fit, evaluate, register, champion or challenger."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import numpy as np
import polars as pl
import pytest
from mlflow import MlflowClient

from mlflow_tg.config import ConfigError
from mlflow_tg.features import columns_of, run_features
from mlflow_tg.predictor import build_dataset, fit, fit_predictor
from mlflow_tg.registry import CHAMPION, FeatureSpec, log_and_register
from mlflow_tg.runs import load_runs
from tests.conftest import CONF_DIR, predictor_config

NAME = "tg-performance-predictor"


def test_first_fit_is_champion_with_metrics_artifacts_signature_and_dataset(champion, population):
    client = MlflowClient(population["uri"])
    version = client.get_model_version_by_alias(NAME, CHAMPION)
    assert champion["alias"] == CHAMPION and version.version == champion["version"]
    assert FeatureSpec.of_version(version) == FeatureSpec(2, "graph+curve+hparams")
    run = client.get_run(champion["run_id"])
    assert run.data.params["runs"] == "24" and run.data.tags["mlflow_tg.alias"] == CHAMPION
    for key in (
        "holdout/graph_curve_hparams/all/kendall_tau",
        "holdout/graph/nontrivial/r2",
        "holdout/val_acc_at_k/all/spearman",
        "transfer/curve/all/mae_points",
    ):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "quality.parquet",
        "training_table.parquet",
        "feature_importance.parquet",
        "predicted_vs_actual.png",
        "feature_importance.png",
    } <= artifacts
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "predictor-training-table"
    inputs = mlflow.models.get_model_info(f"models:/{NAME}@{CHAMPION}").signature.inputs
    types = {column.name: column.type.name for column in inputs.inputs}
    registered_run = next(iter(load_runs(MlflowClient(population["uri"]), "population")))
    built = run_features(registered_run.history, registered_run.params, 2, "graph+curve+hparams")
    assert len(types) == 64 < len(built) and set(types) <= set(built)  # max_features kept
    categories = {"model", "optimizer", "lr_schedule", "data"}
    assert {t for name, t in types.items() if name in categories} <= {"string"}
    assert {t for name, t in types.items() if name not in categories} == {"double"}


def test_quality_table_covers_every_set_split_and_subset(champion):
    quality = champion["quality"]
    sets = set(quality["features"])
    assert sets == {
        "graph", "curve", "hparams", "curve+hparams", "graph+hparams",
        "graph+curve+hparams", "val_acc@k",
    }  # fmt: skip
    assert quality.height == len(sets) * 2 * 2
    held = quality.filter(pl.col("split") == "holdout", pl.col("subset") == "all")
    assert held["runs"].n_unique() == 1 and 3 <= held["runs"][0] <= 21


def test_a_refit_that_does_not_beat_the_champion_becomes_challenger(population):
    name = "tie-test"
    first = fit_predictor(predictor_config(population, f"registered_model={name}"))
    second = fit_predictor(predictor_config(population, f"registered_model={name}"))
    assert (first["alias"], second["alias"]) == ("champion", "challenger")
    client = MlflowClient(population["uri"])
    assert client.get_model_version_by_alias(name, "champion").version == first["version"]
    run = client.get_run(second["run_id"])
    # same data, same seed: identical predictions, and a tie does not move the champion
    assert run.data.metrics["comparison/candidate"] == run.data.metrics["comparison/champion"]


def test_a_better_model_takes_the_champion_alias(population):
    name = "promotion-test"
    cfg = predictor_config(population, f"registered_model={name}")
    mlflow.set_tracking_uri(population["uri"])
    dataset = build_dataset(load_runs(MlflowClient(), "population"), 2, "graph+curve+hparams")
    columns = columns_of(dataset.feature_columns, "graph+curve+hparams")
    x = dataset.matrix(columns)
    inverted = fit(x, -dataset.column("test_acc"), cfg)  # ranks runs backwards
    mlflow.set_experiment("tg-predictor")
    with mlflow.start_run():
        version = log_and_register(inverted, x.head(5), name, FeatureSpec(2, "graph+curve+hparams"))
    MlflowClient().set_registered_model_alias(name, CHAMPION, version.version)
    result = fit_predictor(cfg)
    assert result["alias"] == CHAMPION and int(result["version"]) == 2
    metrics = MlflowClient().get_run(result["run_id"]).data.metrics
    assert metrics["comparison/candidate"] > metrics["comparison/champion"]
    assert metrics["comparison/champion"] < 0


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("k=-1", "k=-1"),
        ("feature_sets=graph+weights", "'graph+weights'"),
        ("holdout_fraction=1.5", "holdout_fraction=1.5"),
        ("selection_metric=accuracy", "selection_metric='accuracy'"),
        ("max_features=-5", "max_features=-5"),
    ],
)
def test_bad_predictor_config_is_refused_before_reading_runs(tmp_path, override, named):
    cfg = predictor_config({"uri": f"sqlite:///{tmp_path}/x.db", "artifacts": str(tmp_path)},
                           override)  # fmt: skip
    with pytest.raises(ConfigError, match=named.replace("+", r"\+")):
        fit_predictor(cfg)
    assert not (tmp_path / "x.db").exists()


def test_predictor_command_on_an_empty_store_exits_2_naming_the_experiment(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mlflow_tg.predictor", f"tracking.uri=sqlite:///{tmp_path}/e.db"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr  # Hydra logs to stdout
    assert "experiment 'population' is not in the tracking store" in output
    assert "Traceback" not in output
    assert (CONF_DIR / "predictor.yaml").is_file()


def test_feature_importances_are_the_registered_models(champion, population):
    client = MlflowClient(population["uri"])
    path = client.download_artifacts(champion["run_id"], "feature_importance.parquet")
    importance = pl.read_parquet(path)
    assert importance["importance"].sum() == pytest.approx(100, rel=1e-6)
    assert np.all(np.diff(importance["importance"].to_numpy()) <= 0)


def test_fit_keeps_the_most_important_features_and_the_dataset_keeps_width(population):
    mlflow.set_tracking_uri(population["uri"])
    dataset = build_dataset(load_runs(MlflowClient(), "population"), 2, "graph+curve+hparams")
    assert "width" in dataset.feature_columns  # a feature, not shadowed by run metadata
    x, y = dataset.matrix(dataset.feature_columns), dataset.column("test_acc")
    kept = fit(x, y, predictor_config(population, "max_features=10"))
    assert len(kept.feature_names_) == 10 and set(kept.feature_names_) <= set(x.columns)
    everything = fit(x, y, predictor_config(population, "max_features=0"))
    assert everything.feature_names_ == list(x.columns)
    top = np.argsort(-everything.get_feature_importance(), kind="stable")[:10]
    assert set(kept.feature_names_) == {x.columns[i] for i in top}
