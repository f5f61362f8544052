"""Graph capture inside your own training loop, logged to the active MLflow run.

``watcher = mlflow_tg.watch(model, example_input)`` traces the model's rolled graph once (a network
the graph cannot represent is refused here, before anything is logged); then, each epoch,
``watcher.log_epoch(epoch, train_loss=…, val_acc=…)`` captures the graph and logs the epoch's
metrics with its ``tg.*`` summaries in one batch call, and ``watcher.log_test(…)`` and
``watcher.finish()`` end the run's record. The run gets what a ``train.py`` run gets, from the
same code (``GraphCapture`` and ``RunLogger``): the ``tg.*`` metrics at ``step = epoch``, the
per-node and per-layer tables, ``history.parquet`` and ``graph/dynamics.png``; so the predictor
reads it alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import mlflow
import polars as pl
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from mlflow_tg import keys
from mlflow_tg.config import translate_error
from mlflow_tg.config.schema import GraphConfig
from mlflow_tg.errors import InputError
from mlflow_tg.graph.capture import GraphCapture
from mlflow_tg.tracking.run import RunLogger, finite_metrics
from mlflow_tg.train.hooks import Epoch


class EpochRunLogger(RunLogger):
    """A RunLogger whose history keeps one row per epoch when an epoch is logged in parts.

    ``watcher.capture(epoch)`` may log an epoch's graph summaries before the loop logs its
    training metrics; the second part joins the first's row of ``history.parquet``.
    """

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log ``metrics`` at ``step=epoch``; merge them into the last row if it is this epoch."""
        if not self.history or self.history[-1][keys.EPOCH] != epoch:
            super().log_epoch(epoch, metrics)
            return
        finite = finite_metrics(metrics)
        self.log_metrics(finite, step=epoch)
        self.history[-1] |= finite
        self.log_table(pl.DataFrame(self.history, infer_schema_length=None), keys.HISTORY)


class Watcher:
    """Captures one model's graph through one MLflow run; made by ``mlflow_tg.watch``."""

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, ...],
        graph: DictConfig,
        run: RunLogger,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.model, self.graph, self.run, self.optimizer = model, graph, run, optimizer
        self.capture_hook = GraphCapture(graph, model, input_shape)
        self.captured: set[int] = set()
        self.last_epoch: int | None = None
        self.epoch_started = time.perf_counter()

    def capture(self, epoch: int) -> dict[str, float]:
        """Capture the graph of the model as it is now, as epoch ``epoch``, and log it.

        Logs the node and layer tables and the ``tg.*`` summaries (at ``step = epoch``, and in
        that epoch's row of ``history.parquet``); returns the summaries. Once per epoch: a
        second call for the same epoch returns {} and logs nothing.
        """
        self.check_order(epoch)
        if epoch in self.captured:
            return {}
        self.captured.add(epoch)
        metrics = self.capture_hook.capture(epoch, self.model, self.run)
        self.record(epoch, metrics)
        return metrics

    def log_epoch(
        self, epoch: int, metrics: Mapping[str, float] | None = None, **named: float
    ) -> dict[str, float]:
        """Log an evaluated epoch as ``train.py`` does, graph summaries included; all it logged.

        Pass the metrics by their ``history.parquet`` names: ``val_loss`` and ``val_acc`` at
        epoch 0 (the untrained network), then also ``train_loss`` and ``train_acc``. At epochs
        1… ``epoch_time_s`` (the time since the previous ``log_epoch`` returned: training and
        evaluation, not capture or logging) and ``lr`` (of the optimizer given to ``watch``,
        read now: call before ``scheduler.step()``) are filled in unless given. The graph is
        captured at epoch 0 and every ``every_n_epochs`` epochs, unless ``capture`` already
        did it for this epoch.
        """
        elapsed = time.perf_counter() - self.epoch_started
        self.check_order(epoch)
        values = {**(metrics or {}), **named}
        if epoch > 0:
            values.setdefault(keys.EPOCH_TIME, elapsed)
            if self.optimizer is not None:
                values.setdefault(keys.LEARNING_RATE, self.optimizer.param_groups[0]["lr"])
        if epoch % self.graph.every_n_epochs == 0 and epoch not in self.captured:
            self.captured.add(epoch)
            # the hook train.py runs after each epoch, so both add the same metrics
            self.capture_hook.on_epoch(Epoch(epoch, self.model, values), self.run)
        self.record(epoch, values)
        self.epoch_started = time.perf_counter()
        return values

    def check_order(self, epoch: int) -> None:
        """InputError, before anything is logged, for an epoch earlier than one logged already.

        ``history.parquet`` has one row per epoch in order: a late epoch would split it.
        """
        if self.last_epoch is not None and epoch < self.last_epoch:
            raise InputError(
                f"epoch {epoch} was logged after epoch {self.last_epoch}: log the epochs in "
                "order (0 for the untrained network, then 1, 2, …)."
            )

    def record(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log metrics at ``step = epoch`` in one batch call and in the epoch's history row."""
        self.run.log_epoch(epoch, metrics)
        self.last_epoch = epoch

    def log_test(self, metrics: Mapping[str, float] | None = None, **named: float) -> None:
        """Log the end-of-run metrics (``test_loss``, ``test_acc``) at the last epoch logged."""
        self.run.log_final({**(metrics or {}), **named}, step=self.last_epoch or 0)

    def finish(self) -> None:
        """Log ``graph/dynamics.png``, the summaries' trajectories over the epochs captured."""
        self.capture_hook.on_end(self.run)


def watch(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    run_id: str | None = None,
    **graph: Any,
) -> Watcher:
    """Watch ``model``'s rolled graph in the active MLflow run (or the run ``run_id``).

    ``example_input`` is one batch as the model takes it (its first dimension is the batch);
    only its shape is used. ``graph`` takes the ``graph.*`` settings of ``train.py``
    (``centralities=["strength", "katz"]``, ``every_n_epochs=2``, ``threads=1``, …), checked the
    same way. Raises InputError (GraphUnsupportedError) for a network the rolled graph cannot
    represent, and for a bad setting or a missing run, before anything is logged.
    """
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise InputError(
                "mlflow_tg.watch logs to the active MLflow run, and none is active: call it "
                "inside `with mlflow.start_run():`, or pass run_id=."
            )
        run_id = active.info.run_id
    settings = graph_settings(graph)
    return Watcher(
        model, tuple(example_input.shape[1:]), settings, EpochRunLogger(run_id), optimizer
    )


def graph_settings(options: Mapping[str, Any]) -> DictConfig:
    """``train.py``'s graph capture settings with ``options``, checked by the same schema."""
    unknown = sorted(set(options) - set(GraphConfig.__dataclass_fields__) - {"enabled"})
    if unknown:
        allowed = [name for name in GraphConfig.__dataclass_fields__ if name != "enabled"]
        raise InputError(
            f"mlflow_tg.watch has no graph setting {', '.join(unknown)}; its settings are "
            f"{allowed} (as train.py's graph.*)."
        )
    try:
        return OmegaConf.structured(GraphConfig(**{**options, "enabled": True}))
    except OmegaConfBaseException as error:  # a value of the wrong type or enum
        raise translate_error(error) or InputError(str(error).splitlines()[0]) from None
