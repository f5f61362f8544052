"""Per-epoch graph capture: model → rolled graph → centralities → summaries → MLflow.

At initialisation (epoch 0) and every ``every_n_epochs`` epochs after it, the edge weights of the
network's rolled graph are refreshed from the current parameters, the configured centralities
computed, and three things logged: ``graph/nodes/epoch_NNN.parquet`` (one row per vertex),
``graph/layers/epoch_NNN.parquet`` (one row per layer) and the compact ``tg.*`` summary metrics,
returned to the caller so that they go out in the same batch call as the epoch's training
metrics. At the end of the run a figure of the summary trajectories is logged as
``graph/dynamics.png``. A snapshot whose weights are NaN or infinite, or whose centralities do
not converge, is skipped with a warning and listed in the ``mlflow_tg.capture_skipped_epochs`` tag.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import polars as pl
from omegaconf import DictConfig
from torch import nn

from mlflow_tg import keys
from mlflow_tg.graph.build import RolledGraphBuilder
from mlflow_tg.graph.centrality import (
    ConvergenceError,
    compute_centralities,
    rayleigh_quotient,
    set_threads,
)
from mlflow_tg.graph.figures import trajectory_figure
from mlflow_tg.graph.summaries import layer_table, node_table, summary_metrics
from mlflow_tg.graph.weights import NonFiniteWeightsError
from mlflow_tg.tracking.run import RunLogger
from mlflow_tg.train.hooks import Epoch

log = logging.getLogger(__name__)


class GraphCapture:
    """Captures the rolled graph of one model through one run."""

    def __init__(self, cfg: DictConfig, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Trace the model's structure; raises GraphUnsupportedError before any run starts."""
        self.cfg = cfg
        set_threads(cfg.threads)
        self.builder = RolledGraphBuilder(
            model, input_shape, fold_batchnorm=cfg.fold_batchnorm, precision=str(cfg.precision)
        )
        self.trajectory: list[dict[str, float]] = []
        self.skipped: list[int] = []
        self.first_layers: pl.DataFrame | None = None  # the first capture's, which growth reads

    def on_epoch(self, epoch: Epoch, run: RunLogger) -> None:
        """Capture at epoch 0 and every ``every_n_epochs``, adding the summaries to the epoch."""
        if epoch.number % self.cfg.every_n_epochs == 0:
            epoch.metrics |= self.capture(epoch.number, epoch.model, run)

    def capture(self, epoch: int, model: nn.Module, run: RunLogger) -> dict[str, float]:
        """Measure the graph of ``model`` as it is now and log its tables."""
        start = time.perf_counter()
        try:
            threads = self.cfg.threads or os.cpu_count() or 1
            self.builder.refresh(model, threads)
            adjacency = self.builder.adjacency(threads)
            centralities = compute_centralities(
                lambda: self.builder.graph,  # built only for betweenness and closeness
                list(self.cfg.centralities),
                pivots=self.cfg.pivots,
                sources=self.cfg.sources,
                seed=self.cfg.seed,
                adjacency=adjacency,
            )
        except (NonFiniteWeightsError, ConvergenceError) as error:
            # one snapshot without a graph is no reason to end the training run
            self.skip(epoch, run, error)
            return {}
        nodes = node_table(self.builder.nodes, centralities)
        layers = layer_table(nodes)
        if self.first_layers is None:
            self.first_layers = layers
        radius = None
        if "eigenvector" in centralities:  # its Rayleigh quotient: one product more
            radius = rayleigh_quotient(adjacency.undirected, centralities["eigenvector"])
        metrics = summary_metrics(nodes, layers, self.builder.num_edges, self.first_layers, radius)
        if self.cfg.node_tables:
            run.log_table(nodes, keys.node_table_path(epoch))
        run.log_table(layers, keys.layer_table_path(epoch))
        if self.cfg.save_graph:
            save_graph(self.builder.graph, epoch, run)
        self.trajectory.append({keys.EPOCH: epoch, **metrics})
        # not a tg.* key: timing is not a property of the network, so no predictor feature
        return metrics | {keys.CAPTURE_TIME: time.perf_counter() - start}

    def skip(self, epoch: int, run: RunLogger, error: Exception) -> None:
        """Warn that this epoch has no capture and list it in the ``keys.CAPTURE_SKIPPED`` tag."""
        log.warning("epoch %d: graph capture skipped, %s", epoch, error)
        self.skipped.append(epoch)
        run.set_tag(keys.CAPTURE_SKIPPED, ",".join(map(str, self.skipped)))

    def on_end(self, run: RunLogger) -> None:
        """Log the figure of the summary trajectories."""
        if not self.trajectory:
            return
        figure = trajectory_figure(self.trajectory, list(self.cfg.centralities))
        run.log_figure(figure, keys.GRAPH_FIGURE)


def save_graph(graph, epoch: int, run: RunLogger) -> None:
    """Log the graph itself, weights included, in graph-tool's format."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"epoch_{epoch:03d}.gt.gz"
        graph.save(str(path))
        run.log_file(path, f"{keys.GRAPH_FILES}/{path.name}")  # through the spool, as the rest
