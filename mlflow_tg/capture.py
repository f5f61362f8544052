"""Per-epoch graph capture: model → rolled graph → centralities → summaries → MLflow.

At initialisation (epoch 0) and every ``every_n_epochs`` epochs after it, the network's rolled
graph is rebuilt from the current weights, its centralities computed, and three things logged:
``graph/nodes/epoch_NNN.parquet`` (one row per node), ``graph/layers/epoch_NNN.parquet`` (one row
per layer) and the compact ``tg.*`` summary metrics, returned to the caller so they go out in the
same batch call as the epoch's training metrics. At the end of the run a figure of the summary
trajectories is logged as ``graph/dynamics.png``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from omegaconf import DictConfig
from torch import nn

from mlflow_tg.tracking import RunLogger

log = logging.getLogger(__name__)
TRAJECTORY_STATS = ("mean", "std", "gini")


class GraphCapture:
    """Captures the rolled graph of one model through one run."""

    def __init__(
        self, cfg: DictConfig, model: nn.Module, input_shape: tuple[int, ...], run: RunLogger
    ) -> None:
        from mlflow_tg.centrality import set_threads
        from mlflow_tg.graph import RolledGraphBuilder

        self.cfg, self.run = cfg, run
        set_threads(cfg.threads)
        self.builder = RolledGraphBuilder(model, input_shape, fold_batchnorm=cfg.fold_batchnorm)
        self.trajectory: list[dict[str, float]] = []
        self.skipped: list[int] = []

    @classmethod
    def from_config(
        cls, cfg: DictConfig, model: nn.Module, input_shape: tuple[int, ...], run: RunLogger
    ) -> GraphCapture | Disabled:
        """A capture for the run, or a stand-in that does nothing when ``graph.enabled=false``."""
        return cls(cfg, model, input_shape, run) if cfg.enabled else Disabled()

    def maybe(self, epoch: int, model: nn.Module) -> dict[str, float]:
        """Capture at epoch 0 and every ``every_n_epochs``; return the summary metrics."""
        if epoch % self.cfg.every_n_epochs:
            return {}
        return self.capture(epoch, model)

    def capture(self, epoch: int, model: nn.Module) -> dict[str, float]:
        """Build, measure and log the graph of ``model`` as it is now."""
        from mlflow_tg.centrality import compute_centralities
        from mlflow_tg.graph import NonFiniteWeightsError
        from mlflow_tg.summaries import layer_table, node_table, summary_metrics

        start = time.perf_counter()
        try:
            with torch.no_grad():
                graph = self.builder.build(model)
        except NonFiniteWeightsError as error:
            log.warning("epoch %d: graph capture skipped, %s", epoch, error)
            self.skipped.append(epoch)
            self.run.set_tag("tg.capture_skipped_epochs", ",".join(map(str, self.skipped)))
            return {}
        centralities = compute_centralities(
            graph,
            list(self.cfg.centralities),
            pivots=self.cfg.pivots,
            sources=self.cfg.sources,
            seed=self.cfg.seed,
        )
        nodes = node_table(graph, centralities)
        if self.cfg.node_tables:
            self.run.log_table(nodes, f"graph/nodes/epoch_{epoch:03d}.parquet")
        self.run.log_table(layer_table(nodes), f"graph/layers/epoch_{epoch:03d}.parquet")
        if self.cfg.save_graph:
            self.save_graph(graph, epoch)
        metrics = summary_metrics(nodes)
        metrics["tg.capture_time_s"] = time.perf_counter() - start
        self.trajectory.append({"epoch": epoch, **metrics})
        return metrics

    def save_graph(self, graph, epoch: int) -> None:
        """Log the graph itself in graph-tool's format."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"epoch_{epoch:03d}.gt.gz"
            graph.save(str(path))
            mlflow.log_artifact(str(path), "graph/graphs", run_id=self.run.run_id)

    def finish(self) -> None:
        """Log the figure of the summary trajectories."""
        if len(self.trajectory) == 0:
            return
        from mlflow_tg.figures import trajectory_figure

        figure = trajectory_figure(self.trajectory, list(self.cfg.centralities), TRAJECTORY_STATS)
        mlflow.log_figure(figure, "graph/dynamics.png", run_id=self.run.run_id)


class Disabled:
    """Stand-in when graph capture is off."""

    def maybe(self, epoch: int, model: nn.Module) -> dict[str, float]:
        """Capture nothing."""
        return {}

    def finish(self) -> None:
        """Log nothing."""
