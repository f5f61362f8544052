"""Live prediction and pruning inside real training jobs, against the session's champion."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_tg import keys
from mlflow_tg.job import train
from tests.conftest import predictor_config, store_job

pytestmark = pytest.mark.slow
CLI = Path(sys.executable).parent / "mlflow-tg"


def job(store: dict[str, str], experiment: str, *overrides: str):
    """A tiny mlp job in the population's store, where the champion is registered."""
    return store_job(store, experiment, "model=mlp", "width=3", *overrides)


def test_live_predictions_are_logged_each_epoch_and_equal_mlflow_tg_predict(
    population, champion, caplog
):
    with caplog.at_level(logging.INFO, logger="mlflow_tg.predictor.live"):
        result = train(job(population, "live", "predict=champion"))
    printed = [m for r in caplog.records if "predicted test accuracy" in (m := r.getMessage())]
    # on the console once per new answer: each window's, and not again past the last (k=3)
    assert [line.split(":")[0] for line in printed] == ["epoch 1", "epoch 2", "epoch 3"]
    assert printed[2].startswith("epoch 3: predicted test accuracy 0.") and "**" not in printed[2]
    client = MlflowClient(population["uri"])
    run_id = result["run_id"]
    live = {m.step: m.value for m in client.get_metric_history(run_id, keys.PREDICTED)}
    assert sorted(live) == [1, 2, 3, 4]  # from the smallest window (1) at every later epoch
    high = {m.step: m.value for m in client.get_metric_history(run_id, keys.PREDICTED_HIGH)}
    low = {m.step: m.value for m in client.get_metric_history(run_id, keys.PREDICTED_LOW)}
    assert all(0 <= low[e] <= live[e] <= high[e] <= 1 for e in live)
    assert keys.PREDICTED_OOD in client.get_run(run_id).data.metrics
    before = client.get_metric_history(run_id, keys.PREDICTED)
    printed = subprocess.run(
        [str(CLI), "predict", "--run-id", run_id, "--tracking-uri", population["uri"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert run_id in printed
    after = client.get_metric_history(run_id, keys.PREDICTED)
    (cli,) = [m for m in after if m not in before]
    # the CLI answers from the largest window the run has (3): the live value at epoch 3
    assert cli.step == 3
    assert cli.value == pytest.approx(live[3], abs=1e-9)
    note = client.get_run(run_id).data.tags[keys.NOTE]  # the run's description on its page
    assert "**mlp** width 3" in note and "after 4 of 4 epochs (completed)" in note
    # one prediction line, the latest: the CLI's answer in place of the live one at the end
    assert note.count("predicted test accuracy ") == 1
    assert f"predicted test accuracy **{cli.value:.3f}** " in note and "epochs 0..3" in note


def test_predicted_pruning_stops_a_job_below_its_mates(population, champion):
    sweep = "live-sweep"
    # mates that reached the top: the population's best final accuracies
    client = MlflowClient(population["uri"])
    experiment = client.get_experiment_by_name("population").experiment_id
    best = client.search_runs([experiment], order_by=["metrics.test_acc DESC"], max_results=5)
    mates = [r.data.metrics[keys.TARGET] for r in best]
    mlflow.set_tracking_uri(population["uri"])
    mlflow.set_experiment("pruned")
    for value in mates:
        with mlflow.start_run(tags={keys.SWEEP: sweep, keys.PRUNED: "false"}):
            mlflow.log_metric(keys.TARGET, value)
    # a learning rate that never learns: its interval ends below the mates' quantile
    weak = job(population, "pruned", "predict=champion", "prune=predicted",
               f"prune.sweep={sweep}", "prune.quantile=0.5", "optimizer.lr=0.0001")  # fmt: skip
    result = train(weak)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[keys.PRUNED] == "true"
    assert result["epochs_completed"] < 4
    assert "upper end" in run.data.tags[keys.PRUNED_BY]
    assert keys.TARGET in run.data.metrics


@pytest.fixture(scope="module")
def window_zero(population) -> str:
    """A version with a window k=0, answering before any training, under a model of its own."""
    from mlflow_tg.predictor.job import fit_predictor

    name = "tg-window-zero"
    fit_predictor(predictor_config(population, "ks=[0,1,2,3]", f"registered_model={name}"))
    return name


def test_a_window_zero_answers_before_training_and_can_prune_there(population, window_zero):
    client = MlflowClient(population["uri"])
    answered = train(job(population, "zero", "predict=champion", f"predict.model={window_zero}"))
    live = client.get_metric_history(answered["run_id"], keys.PREDICTED)
    assert sorted(m.step for m in live) == [0, 1, 2, 3, 4]  # from epoch 0, the initialisation
    sweep = "zero-sweep"
    mlflow.set_tracking_uri(population["uri"])
    mlflow.set_experiment("zero-pruned")
    for _ in range(5):  # mates that reached the top: any interval ending below 1 is below them
        with mlflow.start_run(tags={keys.SWEEP: sweep, keys.PRUNED: "false"}):
            mlflow.log_metric(keys.TARGET, 1.0)
    # a configuration whose runs in the population stay near chance: lenet at learning rate 0.3
    weak = store_job(population, "zero-pruned", "model=lenet", "width=2", "optimizer.lr=0.3",
                     "predict=champion", f"predict.model={window_zero}", "prune=predicted",
                     f"prune.sweep={sweep}")  # fmt: skip
    result = train(weak)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[keys.PRUNED] == "true" and run.data.tags[keys.PRUNED_EPOCH] == "0"
    assert "the 0.5 quantile of 5 sweep-mates" in run.data.tags[keys.PRUNED_BY]  # the bar at 0
    assert result["epochs_completed"] == 0  # stopped before its first training epoch
    assert keys.TARGET in run.data.metrics  # evaluated on the test split as it is
    assert [m.step for m in client.get_metric_history(run.info.run_id, keys.VAL_ACC)] == [0]
