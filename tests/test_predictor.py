"""The predictor on a small real population: fit, evaluate, register, champion or challenger."""

from __future__ import annotations

import itertools
import logging
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
from catboost import CatBoostRegressor
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

from mlflow_tg import keys
from mlflow_tg.errors import ConfigError
from mlflow_tg.keys import HISTORY as HISTORY_ARTIFACT
from mlflow_tg.predictor.answering import PARAM_KEYS, fitted_window, model_input
from mlflow_tg.predictor.dataset import Dataset, build_dataset
from mlflow_tg.predictor.evaluate import best_set, compare, in_holdout
from mlflow_tg.predictor.features import categorical_columns, columns_of, hparam_features, set_of
from mlflow_tg.predictor.fit import fit, keep_every_set
from mlflow_tg.predictor.job import fit_predictor
from mlflow_tg.predictor.model import RunPredictor
from mlflow_tg.predictor.registry import (
    CHALLENGER,
    CHAMPION,
    FeatureSpec,
    Holdout,
    RegistryError,
    log_and_register,
    settle_aliases,
    version_by_alias,
)
from mlflow_tg.predictor.scoring import answer_each, input_columns
from mlflow_tg.tracking.runs import load_run, load_runs, read_history
from tests.conftest import predictor_config, store_job
from tests.servers import free_port

NAME = "tg-performance-predictor"


def registered(population, version: str) -> RunPredictor:
    """A registered version's pyfunc model, unwrapped."""
    mlflow.set_tracking_uri(population["uri"])
    return mlflow.pyfunc.load_model(f"models:/{NAME}/{version}").unwrap_python_model()


class MessagesOf(logging.Handler):
    """The messages a logger emits while in the ``with`` block."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger, self.messages = logger, []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> MessagesOf:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *_) -> None:
        self.logger.removeHandler(self)


def requests_of(records, k: int) -> dict[str, pd.DataFrame]:
    """Each run's request rows, epochs 0..k."""
    return {
        run.run_id: model_input([r for r in run.history if r["epoch"] <= k], run.params, run.run_id)
        for run in records
    }


@pytest.mark.slow
def test_first_fit_is_champion_with_metrics_artifacts_signature_and_dataset(champion, population):
    client = MlflowClient(population["uri"])
    version = client.get_model_version_by_alias(NAME, CHAMPION)
    assert champion["alias"] == CHAMPION and version.version == champion["version"]
    expected = FeatureSpec(2, "graph+curve+hparams", Holdout(0.4, 0), (1, 2, 3))
    assert FeatureSpec.of_version(version) == expected
    assert version.tags["mlflow_tg.ks"] == "1,2,3"
    assert champion["registration_s"] < 30
    run = client.get_run(champion["run_id"])
    assert run.data.params["runs"] == "24" and run.data.tags["mlflow_tg.alias"] == CHAMPION
    assert run.data.params["seed"] == "0" and run.data.params["ensemble"] == "2"
    for key in (
        "holdout/graph_curve_hparams/all/kendall_tau",
        "holdout/graph/nontrivial/r2",
        "holdout/val_acc_at_k/all/spearman",
        "holdout/minus_train_loss.sum/all/kendall_tau",  # the training-speed baseline
        "transfer/curve/all/mae_points",
    ):
        assert key in run.data.metrics, key
    assert "holdout/minus_train_loss.sum/all/r2" not in run.data.metrics  # a score: no R²
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
    info = mlflow.models.get_model_info(f"models:/{NAME}@{CHAMPION}")
    assert set(info.flavors) == {"python_function"}
    specs = {column.name: column for column in info.signature.inputs.inputs}
    assert [specs["run_id"].type.name, specs["epoch"].type.name] == ["string", "long"]
    assert specs["run_id"].required and specs["epoch"].required
    predictor = registered(population, champion["version"])
    assert predictor.ks == [1, 2, 3]
    assert [len(predictor._models[k].members) for k in (1, 2, 3)] == [2, 2, 2]  # conftest's
    kept = predictor_config(population).max_features  # plus, at most, one per set dropped
    assert all(kept <= len(window.columns) <= kept + 2 for window in predictor.windows.values())
    metrics = {metric for window in predictor.windows.values() for metric in window.metrics}
    assert metrics == set(predictor.windows[2].metrics)  # the other windows read k's metrics
    assert set(specs) == {"run_id", "epoch", *metrics, *PARAM_KEYS}
    assert {(specs[m].type.name, specs[m].required) for m in metrics} == {("double", False)}
    assert {(specs[p].type.name, specs[p].required) for p in PARAM_KEYS} == {("string", False)}
    assert info.signature.outputs.input_names() == [
        "run_id", "k", "predicted_test_acc", "predicted_test_acc_low",
        "predicted_test_acc_high", "out_of_distribution", "ood_reasons",
    ]  # fmt: skip
    assert run.data.params["ks"] == "1,2,3"
    for key in ("holdout/coverage80", "holdout/k1/coverage80", "holdout/k3/coverage80"):
        assert 0 <= run.data.metrics[key] <= 1, key
    for k, window in predictor.windows.items():  # each calibration, logged as it is served
        widen = run.data.metrics[f"calibration/k{k}/widen"]
        outside = run.data.metrics[f"calibration/k{k}/widen_outside"]
        assert widen == pytest.approx(window.widen) and widen >= 0
        assert outside == pytest.approx(window.widen_outside) and widen <= outside


@pytest.mark.slow
def test_the_logged_coverage_is_the_share_of_held_out_runs_inside_the_served_interval(
    champion, population
):
    client = MlflowClient(population["uri"])
    run = client.get_run(champion["run_id"])
    table = pl.read_parquet(client.download_artifacts(champion["run_id"], "training_table.parquet"))
    held = table.filter(pl.col("held_out"))
    actual = dict(zip(held["run_id"], held["test_acc"], strict=True))
    records = [load_run(client, run_id) for run_id in actual]
    mlflow.set_tracking_uri(population["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{champion['version']}")
    requests = requests_of(records, 2)
    assert set(next(iter(requests.values())).columns) - set(input_columns(model))  # unread ones
    # MLflow's loggers do not propagate to the root logger: listen on its own
    with MessagesOf(logging.getLogger("mlflow.models.utils")) as warned:
        answers, refused = answer_each(model, requests)
    assert not [message for message in warned.messages if "extra inputs" in message]
    assert not refused and answers["k"].tolist() == [2] * len(actual)
    low, high = answers["predicted_test_acc_low"], answers["predicted_test_acc_high"]
    truth = answers["run_id"].map(actual)
    coverage = float(((low <= truth) & (truth <= high)).mean())
    assert run.data.metrics["holdout/coverage80"] == pytest.approx(coverage)
    assert champion["coverage"][2] == pytest.approx(coverage)
    assert (low <= answers["predicted_test_acc"]).all()
    assert (answers["predicted_test_acc"] <= high).all() and (low >= 0).all() and (high <= 1).all()


@pytest.mark.slow
def test_quality_table_covers_every_set_split_and_subset(champion):
    quality = champion["quality"]
    sets = set(quality["features"])
    assert sets == {
        "graph", "curve", "hparams", "curve+hparams", "graph+hparams",
        "graph+curve+hparams", "val_acc@k", "-train_loss.sum",
    }  # fmt: skip
    assert quality.height == len(sets) * 2 * 2
    held = quality.filter(pl.col("split") == "holdout", pl.col("subset") == "all")
    assert held["runs"].n_unique() == 1 and 3 <= held["runs"][0] <= 21


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_better_model_takes_the_champion_alias(population):
    name = "promotion-test"
    cfg = predictor_config(population, f"registered_model={name}")
    mlflow.set_tracking_uri(population["uri"])
    records = load_runs(MlflowClient(), "population")
    dataset = build_dataset(records, 2, "graph+curve+hparams")
    columns = columns_of(dataset.feature_columns, "graph+curve+hparams")
    x = dataset.matrix(columns)
    inverted = fit(x, 1 - dataset.column("test_acc"), cfg)  # ranks runs backwards
    by_id = {run.run_id: run for run in records}
    hparams = pd.DataFrame([hparam_features(by_id[i].params) for i in dataset.frame["run_id"]])
    window = fitted_window(2, inverted, x, hparams)
    predictor = RunPredictor([window], (0.1, 0.5, 0.9), {2: inverted})
    (example,) = requests_of([by_id[dataset.frame["run_id"][0]]], 2).values()
    mlflow.set_experiment("tg-predictor")
    with mlflow.start_run():
        version = log_and_register(predictor, example, name, FeatureSpec(2, "graph+curve+hparams"))
    MlflowClient().set_registered_model_alias(name, CHAMPION, version.version)
    result = fit_predictor(cfg)
    assert result["alias"] == CHAMPION and int(result["version"]) == 2
    metrics = MlflowClient().get_run(result["run_id"]).data.metrics
    assert metrics["comparison/candidate"] > metrics["comparison/champion"]
    assert metrics["comparison/champion"] < 0
    verdict = MlflowClient().get_run(result["run_id"]).data.tags["mlflow_tg.comparison"]
    assert "assumed the same: the version has no holdout tags" in verdict


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("k=-1", "k=-1"),
        ("feature_sets=graph+weights", "'graph+weights'"),
        ("holdout_fraction=1.5", "holdout_fraction=1.5"),
        ("selection_metric=accuracy", "selection_metric='accuracy'"),
        ("select_on=transfer", "select_on='transfer'"),
        ("max_features=-5", "max_features=-5"),
        ("ensemble=0", "ensemble=0"),
        ("ks=[1,3]", "is not allowed with k=2: ks lists"),
        ("catboost.loss_function=RMSE", "catboost.loss_function='RMSE'"),
        ("compare_sets=[]", "compare_sets=[] is not allowed"),
        ("compare_sets=[graph,weights]", "'weights'"),
        ("tracking.uri=file:///tmp/mlruns", "it names MLflow's file store"),
    ],
)
def test_bad_predictor_config_is_refused_before_reading_runs(tmp_path, override, named):
    cfg = predictor_config({"uri": f"sqlite:///{tmp_path}/x.db", "artifacts": str(tmp_path)},
                           override)  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(named)):
        fit_predictor(cfg)
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("store_exists", [False, True])
def test_predictor_command_on_an_empty_store_exits_2_naming_the_experiment(tmp_path, store_exists):
    store = tmp_path / "e.db"
    if store_exists:
        MlflowClient(f"sqlite:///{store}").search_experiments()  # a store without the runs
    result = subprocess.run(
        [sys.executable, "-m", "mlflow_tg.predictor", f"tracking.uri=sqlite:///{store}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr  # Hydra logs to stdout
    assert "experiment 'population' is not in the tracking store" in output
    assert "Traceback" not in output
    assert store.exists() == store_exists  # none created where there was none
    if store_exists:  # and no experiment of its own for a predictor that never ran
        assert MlflowClient(f"sqlite:///{store}").get_experiment_by_name("tg-predictor") is None


@pytest.mark.slow
def test_feature_importances_are_the_registered_models(champion, population):
    client = MlflowClient(population["uri"])
    path = client.download_artifacts(champion["run_id"], "feature_importance.parquet")
    importance = pl.read_parquet(path)
    columns = registered(population, champion["version"]).windows[2].columns
    assert importance.height == len(columns) and set(importance["feature"]) == set(columns)
    assert np.all(np.diff(importance["importance"].to_numpy()) <= 0)


def same(a: float | str, b: float | str) -> bool:
    """Equal values, or both NaN."""
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return a == b or both_nan


@pytest.mark.slow
def test_a_runs_row_of_the_training_table_is_what_the_served_model_reads(champion, population):
    client = MlflowClient(population["uri"])
    table = pl.read_parquet(client.download_artifacts(champion["run_id"], "training_table.parquet"))
    predictor = registered(population, champion["version"])
    columns = predictor.windows[2].columns
    records = [load_run(client, run_id) for run_id in table["run_id"].head(4)]
    runs, refusals = predictor.read_runs(pd.concat(requests_of(records, 2).values()))
    assert not refusals and [run["k"] for run in runs] == [2] * 4
    for run in runs:
        fitted = Dataset(table.filter(pl.col("run_id") == run["run_id"])).matrix(columns).iloc[0]
        served = dict(zip(columns, run["features"], strict=True))
        assert all(same(fitted[c], served[c]) for c in columns), run["run_id"]


@pytest.mark.slow
def test_fit_keeps_the_most_important_features_and_the_dataset_keeps_width(population):
    mlflow.set_tracking_uri(population["uri"])
    dataset = build_dataset(load_runs(MlflowClient(), "population"), 2, "graph+curve+hparams")
    assert "width" in dataset.feature_columns  # a feature, not shadowed by run metadata
    x, y = dataset.matrix(dataset.feature_columns), dataset.column("test_acc")
    kept = fit(x, y, predictor_config(population, "max_features=10"))
    sets = {set_of(column) for column in kept.feature_names_}
    assert sets == {"graph", "curve", "hparams"}  # a set selection drops keeps its best column
    assert 10 <= len(kept.feature_names_) <= 12 and set(kept.feature_names_) <= set(x.columns)
    assert kept.feature_names_ == [c for c in x.columns if c in kept.feature_names_]  # in order
    everything = fit(x, y, predictor_config(population, "max_features=0"))
    assert everything.feature_names_ == list(x.columns)


HPARAMS_ONLY = ("feature_sets=hparams", "compare_sets=[hparams]")


@pytest.mark.slow
def test_a_fit_without_the_curve_set_still_has_its_baseline_and_reads_only_params(population):
    result = fit_predictor(predictor_config(population, "registered_model=hparams", *HPARAMS_ONLY))
    assert set(result["quality"]["features"]) == {"hparams", "val_acc@k", "-train_loss.sum"}
    inputs = mlflow.models.get_model_info(f"models:/hparams/{result['version']}").signature.inputs
    assert inputs.input_names() == ["run_id", "epoch", *PARAM_KEYS]  # no metric read
    mlflow.set_tracking_uri(population["uri"])
    predictor = mlflow.pyfunc.load_model(f"models:/hparams/{result['version']}")
    categories = {"model", "optimizer", "lr_schedule", "data"}
    window = predictor.unwrap_python_model().windows[2]
    assert categories <= set(window.columns)  # 12 columns, fewer than max_features: all kept


def held_out_by_both(population, seeds: tuple[int, int]) -> tuple[int, int, int]:
    """Runs held out under seed a, under seed b, and under both (fraction 0.4)."""
    mlflow.set_tracking_uri(population["uri"])
    groups = build_dataset(load_runs(MlflowClient(), "population"), 2, "hparams").groups
    first, second = (in_holdout(groups, 0.4, seed) for seed in seeds)
    return int(first.sum()), int(second.sum()), int((first & second).sum())


@pytest.mark.slow
def test_a_champion_of_another_seed_is_compared_on_the_runs_both_held_out(population):
    theirs, ours, both = held_out_by_both(population, (2, 0))
    assert 3 <= both < min(theirs, ours)  # the population's configurations give an overlap
    overrides = ("registered_model=seed-test", *HPARAMS_ONLY)
    first = fit_predictor(predictor_config(population, *overrides, "seed=2"))
    second = fit_predictor(predictor_config(population, *overrides))
    client = MlflowClient(population["uri"])
    registered = client.get_model_version("seed-test", first["version"])
    assert FeatureSpec.of_version(registered).holdout == Holdout(0.4, 2)
    run = client.get_run(second["run_id"])
    assert run.data.metrics["comparison/runs"] == both
    assert f"the {both} runs held out under both" in second["verdict"]
    assert "(seed 0, fraction 0.4)" in second["verdict"]
    assert "(seed 2, fraction 0.4)" in second["verdict"]


@pytest.mark.slow
def test_no_comparison_and_no_promotion_when_too_few_runs_are_held_out_by_both(population):
    both = held_out_by_both(population, (1, 0))[2]
    assert both < 3
    overrides = ("registered_model=disjoint-test", *HPARAMS_ONLY)
    fit_predictor(predictor_config(population, *overrides, "seed=1"))
    second = fit_predictor(predictor_config(population, *overrides))
    assert second["alias"] == "challenger"  # the champion answered the runs, too few to compare
    assert second["verdict"].startswith(f"not compared: only {both} runs held out under both")


@pytest.mark.slow
def test_a_champion_that_cannot_be_loaded_is_replaced_naming_the_error(population, tmp_path):
    name = "broken-test"
    client = MlflowClient(population["uri"])
    client.create_registered_model(name)
    spec = FeatureSpec(2, "hparams", Holdout(0.4, 0))
    broken = client.create_model_version(name, str(tmp_path / "gone"), tags=spec.tags())
    client.set_registered_model_alias(name, CHAMPION, broken.version)
    result = fit_predictor(predictor_config(population, f"registered_model={name}", *HPARAMS_ONLY))
    assert result["alias"] == CHAMPION
    verdict = client.get_run(result["run_id"]).data.tags["mlflow_tg.comparison"]
    assert verdict.startswith(f"champion v{broken.version} cannot be used (")
    assert "cannot serve either" in verdict
    assert client.get_model_version_by_alias(name, CHAMPION).version == result["version"]


@pytest.mark.slow
def test_a_column_based_champion_cannot_score_runs_and_is_replaced_naming_why(population):
    name = "column-test"
    mlflow.set_tracking_uri(population["uri"])
    dataset = build_dataset(load_runs(MlflowClient(), "population"), 2, "hparams")
    x = dataset.matrix(columns_of(dataset.feature_columns, "hparams"))
    old = CatBoostRegressor(iterations=20, verbose=False, allow_writing_files=False,
                            cat_features=categorical_columns(x.columns))  # fmt: skip
    old.fit(x, dataset.column("test_acc"))
    mlflow.set_experiment("tg-predictor")
    with mlflow.start_run():  # a version of the former kind: a bare CatBoost on feature columns
        info = mlflow.catboost.log_model(
            old, name="model", signature=infer_signature(x, old.predict(x)),
            pip_requirements=["catboost"],
        )  # fmt: skip
    spec = FeatureSpec(2, "hparams", Holdout(0.4, 0))
    column_based = mlflow.register_model(info.model_uri, name, tags=spec.tags())
    MlflowClient().set_registered_model_alias(name, CHAMPION, column_based.version)
    result = fit_predictor(predictor_config(population, f"registered_model={name}", *HPARAMS_ONLY))
    assert result["alias"] == CHAMPION and result["version"] != column_based.version
    verdict = MlflowClient().get_run(result["run_id"]).data.tags["mlflow_tg.comparison"]
    assert verdict.startswith(f"champion v{column_based.version} cannot be used (RegistryError: ")
    assert "is a column-based model (flavors: catboost, python_function" in verdict
    assert "it cannot score runs" in verdict and "so the new version replaces it" in verdict


@pytest.mark.slow
def test_a_champion_that_refuses_every_run_of_the_store_is_replaced_naming_why(population):
    from mlflow_tg.job import train

    name = "refusing-test"
    first = fit_predictor(predictor_config(population, f"registered_model={name}"))  # reads tg.*
    for model, lr, seed in itertools.product(("mlp", "lenet"), (0.003, 0.05, 0.3), (0, 1)):
        overrides = (f"model={model}", "width=2", f"optimizer.lr={lr}", f"seed={seed}")
        train(store_job(population, "nograph", *overrides, "graph=off"))
    second = fit_predictor(
        predictor_config(
            population, f"registered_model={name}", "source_experiment=nograph",
            "feature_sets=curve+hparams", "compare_sets=[curve+hparams]",
        )
    )  # fmt: skip
    assert second["alias"] == CHAMPION
    assert second["verdict"].startswith(f"champion v{first['version']} refused all ")
    assert "metric tg." in second["verdict"] and "graph.enabled=true" in second["verdict"]
    assert "so the new version replaces it" in second["verdict"]


@pytest.mark.slow
def test_auto_registers_the_compared_set_best_on_held_out_runs_and_logs_why(population):
    name = "tg-auto-set"
    cfg = predictor_config(
        population, "feature_sets=auto", "compare_sets=[hparams,curve]", f"registered_model={name}"
    )
    result = fit_predictor(cfg)
    run = MlflowClient().get_run(result["run_id"])
    metrics = run.data.metrics
    scores = {  # the lower of held-out and width-transfer τ: the default select_on
        s: min(metrics[f"holdout/{s}/all/kendall_tau"], metrics[f"transfer/{s}/all/kendall_tau"])
        for s in ("hparams", "curve")
    }
    best = max(scores, key=scores.get)
    assert run.data.params["feature_sets"] == best
    assert run.data.params["feature_sets.requested"] == "auto"
    version = MlflowClient().get_model_version(name, result["version"])
    assert FeatureSpec.of_version(version).sets == best
    choice = run.data.tags["mlflow_tg.feature_sets_choice"]
    assert choice.startswith(
        f"best lower of held-out and width-transfer kendall_tau on all runs ({best} "
    )
    assert f"{min(scores, key=scores.get)} {min(scores.values()):.3f} (held out " in choice


def test_the_best_set_wins_ties_go_to_the_first_and_nan_never_wins():
    def scores(tau: float) -> dict:
        return {"holdout": {"all": {"kendall_tau": tau}}}

    quality = {"graph": scores(0.5), "curve": scores(0.7), "hparams": scores(math.nan)}
    chosen, why = best_set(quality, ["hparams", "graph", "curve"], "kendall_tau")
    assert chosen == "curve"
    assert why == "best held-out kendall_tau on all runs (curve 0.700, graph 0.500, hparams nan)"
    assert best_set(quality | {"graph": scores(0.7)}, ["graph", "curve"], "kendall_tau")[0] == (
        "graph"
    )


def test_selecting_on_held_out_and_transfer_takes_the_lower_of_the_two():
    def scores(held: float, moved: float) -> dict:
        return {
            "holdout": {"all": {"kendall_tau": held}},
            "transfer": {"all": {"kendall_tau": moved}},
        }

    # graph is best held out but reads wide networks worst; curve is good both ways
    quality = {"graph": scores(0.8, 0.5), "curve": scores(0.75, 0.7), "hparams": scores(0.6, 0.9)}
    sets = ["graph", "curve", "hparams"]
    assert best_set(quality, sets, "kendall_tau", "holdout")[0] == "graph"
    chosen, why = best_set(quality, sets, "kendall_tau", "holdout_and_transfer")
    assert chosen == "curve"
    assert why == (
        "best lower of held-out and width-transfer kendall_tau on all runs (curve 0.700 (held "
        "out 0.750, transfer 0.700), hparams 0.600 (held out 0.600, transfer 0.900), graph 0.500 "
        "(held out 0.800, transfer 0.500))"
    )
    # no transfer split (one width): the held-out score alone decides
    alone = {
        name: scores(q["holdout"]["all"]["kendall_tau"], math.nan) for name, q in quality.items()
    }
    assert best_set(alone, sets, "kendall_tau", "holdout_and_transfer")[0] == "graph"


def test_selection_that_drops_a_whole_set_keeps_its_last_eliminated_column(caplog):
    columns = ["val_acc@1", "width", "log10_lr", "tg.strength/gini@1", "val_loss@1"]
    with caplog.at_level(logging.WARNING, logger="mlflow_tg.predictor.fit"):
        kept = keep_every_set(columns, selected=[0, 3], eliminated=[1, 4, 2])
    assert kept == [0, 2, 3]  # log10_lr: the hparams column eliminated last
    assert "dropped every hparams column; keeping its most useful one, log10_lr" in caplog.text
    assert keep_every_set(columns, selected=[0, 1, 3], eliminated=[4, 2]) == [0, 1, 3]


@pytest.mark.slow
def test_width_transfer_of_runs_of_one_width_is_not_available(population):
    mlflow.set_tracking_uri(population["uri"])
    dataset = build_dataset(load_runs(MlflowClient(), "population"), 2, "curve+hparams")
    narrow = Dataset(dataset.frame.filter(pl.col("run_width") == 2))
    holdout = np.arange(narrow.frame.height) % 3 == 0
    cfg = predictor_config(population)
    comparison = compare(narrow, cfg, holdout, ["hparams"], "hparams")
    assert comparison.transfer == "not available: it needs 2 distinct widths, the runs have [2.0]"
    transfer = comparison.table.filter(pl.col("split") == "transfer")
    assert transfer.height == 6 and (transfer["runs"] == 0).all()  # hparams and 2 baselines
    assert transfer["kendall_tau"].is_nan().all()


def log_run(client: MlflowClient, experiment: str, metrics: dict, history: list | None) -> str:
    """A finished run with these metrics and, unless None, this history artifact."""
    run_id = client.create_run(experiment).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    if history is not None:
        with tempfile.TemporaryDirectory() as tmp:
            pl.DataFrame(history).write_parquet(Path(tmp) / HISTORY_ARTIFACT)
            client.log_artifact(run_id, str(Path(tmp) / HISTORY_ARTIFACT))
    client.set_terminated(run_id)
    return run_id


def test_a_finished_run_without_history_is_left_out_and_logged(client, tmp_path, caplog):
    experiment = client.create_experiment("population", str(tmp_path / "artifacts"))
    history = [
        {"epoch": 0, "val_acc": 0.1, "val_loss": 2.0, "train_loss": None, "train_acc": None},
        {"epoch": 1, "val_acc": 0.5, "val_loss": 1.0, "train_loss": 1.5, "train_acc": 0.4},
    ]
    good = log_run(client, experiment, {"test_acc": 0.6}, history)
    bare = log_run(client, experiment, {"test_acc": 0.7}, None)
    unscored = log_run(client, experiment, {}, history)  # finished, no final accuracy
    client.create_run(experiment)  # still running: not listed
    with caplog.at_level(logging.WARNING, logger="mlflow_tg.runs"):
        records = {r.run_id: r for r in load_runs(client, "population")}
    assert set(records) == {good, bare, unscored}
    assert records[good].history == history
    assert records[bare].history is None and records[unscored].history is None  # not read
    assert f"1 finished runs of 'population' have no {HISTORY_ARTIFACT}" in caplog.text
    assert bare in caplog.text
    dataset = build_dataset(list(records.values()), 1, "curve")
    assert dataset.frame["run_id"].to_list() == [good]
    assert dataset.left_out == {"no test_acc": 1, f"no {HISTORY_ARTIFACT}": 1}


def test_runs_tagged_pruned_are_left_out_and_counted(client, tmp_path):
    experiment = client.create_experiment("population", str(tmp_path / "artifacts"))
    history = [
        {"epoch": 0, "val_acc": 0.1, "val_loss": 2.0, "train_loss": None, "train_acc": None},
        {"epoch": 1, "val_acc": 0.5, "val_loss": 1.0, "train_loss": 1.5, "train_acc": 0.4},
    ]
    pruned, kept, spared = (log_run(client, experiment, {"test_acc": 0.3}, history) for _ in "abc")
    client.set_tag(pruned, keys.PRUNED, "true")
    client.set_tag(spared, keys.PRUNED, "false")  # the policy let it finish
    dataset = build_dataset(load_runs(client, "population"), 1, "curve")
    assert sorted(dataset.frame["run_id"].to_list()) == sorted([kept, spared])
    assert dataset.left_out == {"pruned": 1}


def test_a_versions_windows_are_in_its_tags(client, tmp_path):
    spec = FeatureSpec(2, "curve", Holdout(0.4, 0), (1, 2, 5))
    client.create_registered_model("windows")
    version = client.create_model_version("windows", str(tmp_path), tags=spec.tags())
    assert version.tags["mlflow_tg.ks"] == "1,2,5" and FeatureSpec.of_version(version) == spec
    older = client.create_model_version("windows", str(tmp_path), tags={"mlflow_tg.k": "2",
                                        "mlflow_tg.feature_sets": "curve"})  # fmt: skip
    assert FeatureSpec.of_version(older).ks == ()


def test_a_version_compared_with_a_champion_that_has_since_moved_is_not_promoted(client, tmp_path):
    client.create_registered_model("moved")
    old, newer, mine = (client.create_model_version("moved", str(tmp_path)) for _ in "abc")
    client.set_registered_model_alias("moved", CHAMPION, newer.version)  # another job's promotion
    alias, why = settle_aliases(client, "moved", mine, beats_champion=True, compared=old)
    assert alias == CHALLENGER and f"the champion moved to v{newer.version}" in why
    assert client.get_model_version_by_alias("moved", CHAMPION).version == newer.version
    alias, why = settle_aliases(client, "moved", mine, beats_champion=True, compared=newer)
    assert (alias, why) == (CHAMPION, "")
    assert client.get_model_version_by_alias("moved", CHAMPION).version == mine.version


class FailingDownloads:
    """A client whose downloads fail as MLflow's do, and whose listing shows ``listed``."""

    def __init__(self, code: int, listed: list[str]):
        self.code, self.listed = code, listed

    def download_artifacts(self, run_id, path, dst_path):
        raise MlflowException("Failed to download artifacts", error_code=self.code)

    def list_artifacts(self, run_id):
        return [type("FileInfo", (), {"path": path}) for path in self.listed]


def test_only_a_missing_history_reads_as_none_a_failing_store_raises():
    assert read_history(FailingDownloads(RESOURCE_DOES_NOT_EXIST, []), "r") is None
    with pytest.raises(MlflowException):  # listed, so the download failed for another reason
        read_history(FailingDownloads(RESOURCE_DOES_NOT_EXIST, [HISTORY_ARTIFACT]), "r")
    with pytest.raises(MlflowException):
        read_history(FailingDownloads(INTERNAL_ERROR, []), "r")


def test_registry_reads_no_model_or_alias_as_none_and_an_unreachable_one_as_an_error(
    client, monkeypatch
):
    assert version_by_alias(client, "nothing", CHAMPION) is None
    client.create_registered_model("aliasless")
    assert version_by_alias(client, "aliasless", CHAMPION) is None
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    unreachable = MlflowClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RegistryError, match="could not read the alias 'champion' of model 'x'"):
        version_by_alias(unreachable, "x", CHAMPION)


def test_a_version_without_its_feature_tags_is_a_clear_error(client, tmp_path):
    client.create_registered_model("untagged")
    version = client.create_model_version("untagged", str(tmp_path), tags={"mlflow_tg.k": "2"})
    with pytest.raises(RegistryError) as error:
        FeatureSpec.of_version(version)
    message = str(error.value)
    assert "model 'untagged' version 1 has no usable feature spec" in message
    assert "mlflow_tg.k" in message and "mlflow_tg.feature_sets" in message
