"""Graph capture inside training runs: what lands in MLflow, and that training is untouched."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import pytest
import torch
from scipy.sparse.linalg import ArpackNoConvergence

import mlflow_tg.graph.capture as capture
import mlflow_tg.graph.centrality as centrality
from mlflow_tg.job import train
from tests.conftest import all_runs


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_capture_logs_epoch_zero_and_every_epoch_tables_metrics_and_figure(make_cfg, client):
    result = train(make_cfg("model=lenet", "epochs=2"))
    run = client.get_run(result["run_id"])
    tg_keys = [key for key in run.data.metrics if key.startswith("tg.")]
    # per default centrality: 9 statistics + 4 depth quartiles × (mean, gini) + 3 scale-free;
    # + 2 graph sizes, 2 of strength's growth and the spectral radius
    assert len(tg_keys) == 3 * (9 + 4 * 2 + 3) + 2 + 2 + 1 == 65
    assert "capture_time_s" in run.data.metrics
    assert metric_steps(client, run.info.run_id, "tg.eigenvector/mean") == [0, 1, 2]
    nodes_dir = {a.path for a in client.list_artifacts(run.info.run_id, "graph/nodes")}
    assert nodes_dir == {f"graph/nodes/epoch_00{e}.parquet" for e in range(3)}
    layers = {a.path for a in client.list_artifacts(run.info.run_id, "graph/layers")}
    assert len(layers) == 3
    assert "graph/dynamics.png" in {a.path for a in client.list_artifacts(run.info.run_id, "graph")}
    nodes = pl.read_parquet(
        client.download_artifacts(run.info.run_id, "graph/nodes/epoch_000.parquet")
    )
    # lenet width 2 on digits: 1 input channel + 2 + 4 conv channels + 16 + 8 + 10 neurons
    assert nodes.height == 1 + 2 + 4 + 16 + 8 + 10
    assert {"strength", "eigenvector", "pagerank"} <= set(nodes.columns)
    history = pl.read_parquet(client.download_artifacts(run.info.run_id, "history.parquet"))
    assert history["tg.eigenvector/mean"].null_count() == 0
    # growth compares each layer with itself at the first capture: none at epoch 0, then some
    assert history["tg.strength/growth.mean"][0] == 0.0
    assert history["tg.strength/growth.mean"][1:].abs().min() > 0


def test_spectral_radius_is_the_largest_eigenvalue_of_the_graph_adjacency():
    """λ_max from the capture against a dense eigendecomposition of graph-tool's own matrix."""
    from graph_tool import spectral

    from mlflow_tg.graph.build import RolledGraphBuilder

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 36, 5)
    )
    builder = RolledGraphBuilder(model, (1, 8, 8))
    builder.refresh(model)
    eigenvector = centrality.compute_centralities(
        builder.graph, ["eigenvector"], adjacency=builder.adjacency()
    )["eigenvector"]
    radius = centrality.rayleigh_quotient(builder.adjacency().undirected, eigenvector)
    dense = spectral.adjacency(builder.graph, weight=builder.graph.ep["weight"]).toarray()
    assert radius == pytest.approx(np.linalg.eigvalsh(dense)[-1], rel=1e-9)


def test_capture_does_not_change_training(make_cfg, client):
    with_graph = train(make_cfg("model=resnet", "epochs=2", "graph=full"))
    without = train(make_cfg("model=resnet", "epochs=2", "graph=off"))
    assert with_graph["test_loss"] == without["test_loss"]
    for key in ("train_loss", "val_loss"):
        a = [m.value for m in client.get_metric_history(with_graph["run_id"], key)]
        b = [m.value for m in client.get_metric_history(without["run_id"], key)]
        assert a == b


def test_every_n_epochs_thins_captures_but_keeps_epoch_zero(make_cfg, client):
    result = train(make_cfg("model=mlp", "epochs=4", "graph.every_n_epochs=3"))
    assert metric_steps(client, result["run_id"], "tg.strength/mean") == [0, 3]


def test_graph_off_logs_no_graph_metrics(make_cfg, client):
    result = train(make_cfg("model=mlp", "graph=off"))
    run = client.get_run(result["run_id"])
    assert not [key for key in run.data.metrics if key.startswith("tg.")]
    assert not client.list_artifacts(run.info.run_id, "graph")


def test_save_graph_logs_graph_tool_files(make_cfg, client):
    result = train(make_cfg("model=mlp", "graph.save_graph=true"))
    files = {a.path for a in client.list_artifacts(result["run_id"], "graph/graphs")}
    assert files == {"graph/graphs/epoch_000.gt.gz", "graph/graphs/epoch_001.gt.gz"}


def test_non_finite_weights_skip_the_capture_with_a_warning(make_cfg, client, caplog, monkeypatch):
    original = capture.GraphCapture.capture

    def poisoned(self, epoch, model, run):
        if epoch == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return original(self, epoch, model, run)

    monkeypatch.setattr(capture.GraphCapture, "capture", poisoned)
    with caplog.at_level(logging.WARNING):
        result = train(make_cfg("model=mlp", "epochs=1"))
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow_tg.capture_skipped_epochs"] == "1"
    assert metric_steps(client, run.info.run_id, "tg.strength/mean") == [0]
    assert "graph capture skipped" in caplog.text


def test_solver_failure_skips_the_capture_with_a_warning(make_cfg, client, caplog, monkeypatch):
    def failing_at_epoch_one(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # one eigsh per capture: epoch 0, then epoch 1
            raise ArpackNoConvergence("ARPACK error -1", np.empty(0), np.empty((0, 0)))
        return original(*args, **kwargs)

    calls, original = [], centrality.eigsh
    monkeypatch.setattr(centrality.coarse, "MAX_PRODUCTS", 0)  # the two-level solver hands over
    monkeypatch.setattr(centrality, "eigsh", failing_at_epoch_one)
    with caplog.at_level(logging.WARNING):
        result = train(make_cfg("model=mlp", "epochs=2"))
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow_tg.capture_skipped_epochs"] == "1"
    assert metric_steps(client, run.info.run_id, "tg.strength/mean") == [0, 2]
    assert "epoch 1: graph capture skipped, eigenvector did not converge" in caplog.text


@pytest.mark.parametrize("bad", ["graph.every_n_epochs=0", "graph.centralities=[closeness2]"])
def test_bad_graph_options_fail_before_the_run(make_cfg, client, bad):
    from mlflow_tg.errors import ConfigError

    with pytest.raises(ConfigError):
        train(make_cfg(bad))
    assert all_runs(client) == []
