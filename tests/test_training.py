"""Training runs land in a real MLflow store with the params, metrics and artifacts promised."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch
from mlflow.entities import RunStatus

import mlflow_tg.train.loop as training
from mlflow_tg.job import train
from mlflow_tg.keys import ERROR
from mlflow_tg.tracking.run import RunLogger
from tests.conftest import CONF_DIR, all_runs

TRAINING_METRICS = ["train_loss", "train_acc", "epoch_time_s", "lr"]
MODELS = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_one_epoch_on_digits(make_cfg, client, model):
    result = train(make_cfg(f"model={model}", "graph=off"))
    assert 0 <= result["test_acc"] <= 1 and math.isfinite(result["test_loss"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == model


def test_run_records_params_tags_every_epoch_and_history(make_cfg, client):
    result = train(make_cfg("model=mlp", "epochs=3", "graph=off", "seed=7"))
    run = client.get_run(result["run_id"])
    assert run.info.run_name == "mlp-w2-s7"
    params = run.data.params
    assert params["width"] == "2" and params["optimizer.lr"] == "0.05"
    assert params["data.name"] == "digits" and params["model.hidden_multipliers"] == "[8, 4]"
    tags = run.data.tags
    assert tags["mlflow_tg.version"] and len(tags["mlflow_tg.config_id"]) == 12
    assert "mlflow_tg.git_commit" in tags
    for key in TRAINING_METRICS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3], key
    for key in ("val_loss", "val_acc"):  # epoch 0 is the untrained network
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3], key
    assert run.data.metrics["test_acc"] == pytest.approx(result["test_acc"])
    history = read_history(client, run.info.run_id)
    assert history["epoch"].to_list() == [0, 1, 2, 3]
    assert history["val_acc"].to_list() == pytest.approx(
        [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")]
    )


def read_history(client, run_id: str) -> pl.DataFrame:
    path = client.download_artifacts(run_id, "history.parquet")
    return pl.read_parquet(path)


def test_same_seed_gives_identical_metrics(make_cfg):
    first = train(make_cfg("model=lenet", "epochs=2", "graph=off"))
    second = train(make_cfg("model=lenet", "epochs=2", "graph=off"))
    assert first["test_loss"] == second["test_loss"]


def test_cosine_schedule_reaches_zero(make_cfg, client):
    result = train(make_cfg("model=mlp", "epochs=2", "lr_schedule=cosine", "graph=off"))
    lrs = [m.value for m in client.get_metric_history(result["run_id"], "lr")]
    assert sorted(lrs, reverse=True) == pytest.approx([0.05, 0.025])


def test_diverging_run_is_tagged_keeps_finite_metrics_and_finishes(make_cfg, client, monkeypatch):
    def blowing_up_at_epoch_three(model, *args):
        epochs.append(1)
        if len(epochs) == 3:  # the weights overflow: the loss of the next batch is NaN
            with torch.no_grad():
                next(model.parameters()).fill_(math.inf)
        return original(model, *args)

    epochs, original = [], training.train_one_epoch
    monkeypatch.setattr(training, "train_one_epoch", blowing_up_at_epoch_three)
    result = train(make_cfg("model=mlp", "epochs=4", "graph=off"))
    run = client.get_run(result["run_id"])
    assert result["diverged"] and run.data.tags["diverged"] == "true"
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow_tg.diverged_epoch"] == "3"
    assert result["epochs_completed"] == 2
    for key, steps in (("train_loss", [1, 2]), ("val_loss", [0, 1, 2])):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == steps, key
        assert all(math.isfinite(m.value) for m in history), key


def test_failure_ends_the_run_failed_with_the_message(make_cfg, client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(training, "evaluate", broken)
    with pytest.raises(RuntimeError):
        train(make_cfg("model=mlp", "graph=off"))
    (run,) = all_runs(client)
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow_tg.error"] == "RuntimeError: disk on fire"


def test_failure_ends_the_run_failed_even_when_the_error_tag_is_refused(
    make_cfg, client, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    def refused(self, key, value):
        if key == ERROR:
            raise OSError("store unreachable")

    monkeypatch.setattr(training, "evaluate", broken)
    monkeypatch.setattr(RunLogger, "set_tag", refused)
    with pytest.raises(OSError) as error:
        train(make_cfg("model=mlp", "graph=off"))
    assert isinstance(error.value.__context__, RuntimeError)  # the original error is kept
    (run,) = all_runs(client)
    assert run.info.status == "FAILED"


def test_ctrl_c_ends_the_run_killed(make_cfg, client, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg("model=mlp", "graph=off"))
    (run,) = all_runs(client)
    assert run.info.status == RunStatus.to_string(RunStatus.KILLED)


@pytest.mark.slow
def test_tracking_server_receives_the_run(make_cfg, tracking_server):
    from mlflow import MlflowClient

    result = train(
        make_cfg("model=mlp", "graph=off", "tracking=server", f"tracking.uri={tracking_server}")
    )
    run = MlflowClient(tracking_server).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["test_acc"] == result["test_acc"]
    assert read_history(MlflowClient(tracking_server), run.info.run_id)["epoch"].to_list() == [0, 1]
