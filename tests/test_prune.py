"""Pruning: the policies on hand-made sweeps, and a real training job pruned by its sweep-mates."""

from __future__ import annotations

import re

import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient

from mlflow_tg import keys
from mlflow_tg.errors import ConfigError
from mlflow_tg.job import train
from mlflow_tg.prune.hook import MateCurves
from mlflow_tg.prune.policies import MedianPolicy, PredictedPolicy, RunView
from tests.conftest import all_runs


def mates_expecting(*finals: float) -> list[RunView]:
    return [RunView(final=value) for value in finals]


def test_predicted_policy_waits_for_its_warmup_mates():
    policy = PredictedPolicy(quantile=0.5, warmup=3)
    run = RunView(predicted=0.1, predicted_high=0.2)
    assert policy.decide(1, run, mates_expecting(0.9, 0.9)) is None
    assert "below 0.900" in policy.decide(1, run, mates_expecting(0.9, 0.9, 0.9))


def test_predicted_policy_stops_only_when_the_whole_interval_is_below_the_bar():
    policy = PredictedPolicy(quantile=0.75, warmup=4)
    mates = mates_expecting(0.2, 0.4, 0.6, 0.8)  # 0.75 quantile: 0.65
    assert policy.decide(2, RunView(predicted=0.5, predicted_high=0.64), mates) is not None
    assert policy.decide(2, RunView(predicted=0.5, predicted_high=0.66), mates) is None
    assert policy.decide(2, RunView(val_acc={2: 0.0}), mates) is None  # no prediction yet


def test_predicted_policy_counts_a_running_mate_by_its_prediction():
    policy = PredictedPolicy(quantile=0.5, warmup=2)
    mates = [RunView(predicted=0.9), RunView(final=0.8), RunView()]  # the last knows nothing
    reason = policy.decide(1, RunView(predicted=0.1, predicted_high=0.3), mates)
    assert "0.850" in reason and "2 sweep-mates" in reason


def test_predicted_policy_can_stop_a_job_before_its_first_epoch():
    policy = PredictedPolicy(quantile=0.5, warmup=2)
    run = RunView(val_acc={0: 0.1}, predicted=0.1, predicted_high=0.2)  # a window k=0 answered
    assert policy.ready(0, run)
    assert "below 0.900" in policy.decide(0, run, mates_expecting(0.9, 0.9))
    assert not policy.ready(0, RunView(val_acc={0: 0.1}))  # no window 0: nothing to decide


def test_the_bar_before_training_is_the_lower_of_the_two_quantiles():
    mates, run = mates_expecting(0.2, 0.8), RunView(predicted=0.3, predicted_high=0.5)
    gentle = PredictedPolicy(quantile=0.9, warmup=2, quantile_before_training=0.1)
    assert gentle.decide(0, run, mates) is None  # bar 0.26 at epoch 0
    assert gentle.decide(1, run, mates) is not None  # bar 0.74 later
    assert PredictedPolicy(0.9, 2, None).decide(0, run, mates) is not None  # None: the same bar
    low = PredictedPolicy(quantile=0.1, warmup=2, quantile_before_training=0.5)
    assert low.decide(0, run, mates) == low.decide(1, run, mates) is None  # never above later


def test_median_policy_compares_with_mates_at_the_same_epoch():
    policy = MedianPolicy(warmup=3, min_epoch=1)
    mates = [RunView(val_acc={1: v, 2: 0.99}) for v in (0.3, 0.5, 0.7)]
    assert "below the median 0.500" in policy.decide(1, RunView(val_acc={1: 0.4}), mates)
    assert policy.decide(1, RunView(val_acc={1: 0.6}), mates) is None
    assert policy.decide(0, RunView(val_acc={0: 0.0}), mates) is None  # before min_epoch
    assert not policy.ready(0, RunView(val_acc={0: 0.0}))
    assert policy.decide(3, RunView(val_acc={3: 0.0}), mates) is None  # no mate reached 3


def log_mates(tracking_uri: str, val_acc: float, count: int = 5, sweep: str = "s1") -> None:
    """Finished runs of a sweep, as earlier jobs would have left them."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("tests")
    for _ in range(count):
        with mlflow.start_run(tags={keys.SWEEP: sweep, keys.PRUNED: "false"}):
            for epoch in range(4):
                mlflow.log_metric(keys.VAL_ACC, val_acc, step=epoch)
            mlflow.log_metric(keys.TARGET, val_acc, step=3)


def test_a_job_below_its_mates_median_is_pruned_evaluated_and_finished(
    make_cfg, tracking_uri, client: MlflowClient
):
    log_mates(tracking_uri, val_acc=1.0)
    result = train(make_cfg("model=mlp", "epochs=3", "graph=off", "prune=median", "prune.sweep=s1"))
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[keys.PRUNED] == "true" and run.data.tags[keys.PRUNED_EPOCH] == "1"
    assert "below the median 1.000 of 5 sweep-mates" in run.data.tags[keys.PRUNED_BY]
    assert keys.TARGET in run.data.metrics  # evaluated on the test split as it is
    history = pl.read_parquet(client.download_artifacts(result["run_id"], keys.HISTORY))
    assert history["epoch"].to_list() == [0, 1]
    assert "stopped: pruned" in run.data.tags[keys.NOTE]


def test_a_job_above_its_mates_trains_its_whole_budget_and_says_so(
    make_cfg, tracking_uri, client: MlflowClient
):
    log_mates(tracking_uri, val_acc=0.0)
    result = train(make_cfg("model=mlp", "epochs=2", "graph=off", "prune=median", "prune.sweep=s1"))
    run = client.get_run(result["run_id"])
    assert run.data.tags[keys.PRUNED] == "false"
    assert result["epochs_completed"] == 2
    sweep = {r.data.tags.get(keys.SWEEP) for r in all_runs(client)}
    assert sweep == {"s1"}  # the job joined its mates' sweep


@pytest.mark.parametrize(
    ("policy", "reads"),
    [
        (["prune=median"], 2),  # after epochs 1 and 2; at epoch 0 the median rule waits
        (["prune=predicted", "predict=champion"], 0),  # no registry here: never a prediction
    ],
)
def test_mates_are_read_only_when_the_policy_has_something_to_decide(
    make_cfg, tracking_uri, client: MlflowClient, monkeypatch, policy, reads
):
    log_mates(tracking_uri, val_acc=0.0)
    searches: list[str] = []
    real_search = MlflowClient.search_runs

    def counted_search(self, *args, **kwargs):
        searches.append(kwargs.get("filter_string", ""))
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_runs", counted_search)
    cfg = make_cfg("model=mlp", "epochs=2", "graph=off", *policy, "prune.sweep=s1")
    assert train(cfg)["epochs_completed"] == 2
    assert len([f for f in searches if keys.SWEEP in f]) == reads


def test_mates_curves_are_read_again_only_while_they_can_change(tracking_uri, client, monkeypatch):
    log_mates(tracking_uri, val_acc=0.5, count=3)
    with mlflow.start_run(tags={keys.SWEEP: "s1"}) as running:  # a mate still training
        mlflow.log_metric(keys.VAL_ACC, 0.1, step=0)
        reads: list[str] = []
        real_read = client.get_metric_history

        def counted_read(run_id: str, key: str):
            reads.append(run_id)
            return real_read(run_id, key)

        monkeypatch.setattr(client, "get_metric_history", counted_read)
        curves = MateCurves()

        def curves_at(epoch: int) -> dict[str, dict[int, float]]:
            found = client.search_runs(
                [running.info.experiment_id], filter_string=f"tags.`{keys.SWEEP}` = 's1'"
            )
            return {mate.info.run_id: curves.through(client, mate, epoch) for mate in found}

        assert len(curves_at(1)) == 4 and len(reads) == 4  # each mate read once
        assert len(curves_at(1)) == 4 and reads[4:] == [running.info.run_id]  # lacks epoch 1
        mlflow.log_metric(keys.VAL_ACC, 0.2, step=1)
        assert curves_at(1)[running.info.run_id] == {0: 0.1, 1: 0.2}
        assert curves_at(1)[running.info.run_id] == {0: 0.1, 1: 0.2}  # cached: has epoch 1
        assert reads[4:] == [running.info.run_id] * 2
        finished = [run_id for run_id in reads[:4] if run_id != running.info.run_id]
        for epoch in (2, 3, 4):
            assert all(
                curves_at(epoch)[run_id] == {e: 0.5 for e in range(4)} for run_id in finished
            )
        assert set(reads[6:]) == {running.info.run_id}  # the ended mates were never read again
    late = finished[0]  # ended, then given an epoch (mlflow-tg reap, then replay)
    client.log_metric(late, keys.VAL_ACC, 0.7, step=4)
    assert curves_at(4)[late] == {**{e: 0.5 for e in range(4)}, 4: 0.7}
    assert reads.count(late) == 2
    curves_at(4)
    assert reads.count(late) == 2  # read again once


@pytest.mark.parametrize("policy", ["median", "predicted"])
def test_a_job_outside_any_sweep_is_never_pruned(make_cfg, client, policy, caplog):
    overrides = ["model=mlp", "epochs=2", "graph=off", f"prune={policy}"]
    if policy == "predicted":
        overrides.append("predict=champion")  # no registry here: one warning, training goes on
    result = train(make_cfg(*overrides))
    assert result["epochs_completed"] == 2
    assert "not part of a sweep" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["prune=predicted"], "prune=predicted is not allowed with predict=off"),
        (["prune=median", "prune.quantile=1.5"], "prune.quantile=1.5 is not allowed"),
        (
            ["prune=predicted", "predict=champion", "prune.quantile_before_training=-0.1"],
            "prune.quantile_before_training=-0.1 is not allowed: prune.quantile_before_training "
            "must be a number ≥ 0 and < 1",
        ),
        (["prune=median", "prune.warmup=-1"], "prune.warmup=-1 is not allowed"),
        (["predict=endpoint", "predict.endpoint=localhost:5001"], "predict.endpoint="),
    ],
)
def test_bad_pruning_and_prediction_settings_are_refused_before_any_run(
    make_cfg, client, overrides, named
):
    with pytest.raises(ConfigError, match=re.escape(named)):
        train(make_cfg("model=mlp", "graph=off", *overrides))
    assert all_runs(client) == []
