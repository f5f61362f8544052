"""A PyTorch Lightning callback that captures the rolled graph, as ``train.py`` runs do.

Needs the optional ``lightning`` package (``pip install -e '.[lightning]'``); the rest of
mlflow_tg never imports this module. The callback is ``mlflow_tg.watch`` driven by the trainer's
hooks: epoch 0 after the sanity check (the untrained network; ``num_sanity_val_steps=-1``
evaluates the whole validation set there, as ``train.py`` does), then every training epoch with
the metrics the module logged, then the test metrics and the figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import mlflow
import torch

from mlflow_tg import keys
from mlflow_tg.errors import InputError
from mlflow_tg.integrations.watch import Watcher, watch

EPOCH_METRICS = (keys.TRAIN_LOSS, keys.TRAIN_ACC, keys.VAL_LOSS, keys.VAL_ACC)
VAL_METRICS = (keys.VAL_LOSS, keys.VAL_ACC)
TRAIN_METRICS = (keys.TRAIN_LOSS, keys.TRAIN_ACC)
TEST_METRICS = (keys.TEST_LOSS, keys.TEST_ACC)


class GraphCaptureCallback(pl.Callback):
    """Logs each epoch's metrics and ``tg.*`` graph summaries to the active MLflow run.

    The LightningModule logs ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc`` (and
    ``test_loss``, ``test_acc`` in ``trainer.test``) with ``self.log(..., on_epoch=True)``;
    ``names`` maps a ``history.parquet`` name to another key it logs (``{"val_acc":
    "val/accuracy"}``). ``example_input`` is one batch (default: the module's
    ``example_input_array``); ``graph`` takes ``train.py``'s ``graph.*`` settings. The run is
    ``run_id``, else the active MLflow run, else the run of the trainer's ``MLFlowLogger``.
    """

    def __init__(
        self,
        example_input: torch.Tensor | None = None,
        names: Mapping[str, str] | None = None,
        run_id: str | None = None,
        **graph: Any,
    ) -> None:
        self.example_input, self.run_id, self.graph = example_input, run_id, graph
        self.names = dict(names or {})
        self.watcher: Watcher | None = None
        self.validated: int | None = None  # the epoch whose validation metrics Lightning holds

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Trace the module's graph before any epoch: an unsupported network stops here."""
        self.validated = None
        example = self.example_input
        if example is None:
            example = pl_module.example_input_array
        if example is None:
            raise InputError(
                "GraphCaptureCallback needs one input batch: pass example_input= or set the "
                "module's example_input_array."
            )
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        run_id = self.run_id or logger_run_id(trainer)
        if run_id is None and mlflow.active_run() is None:
            raise InputError(
                "GraphCaptureCallback logs to the active MLflow run, or to the run of the "
                "trainer's MLFlowLogger, and there is neither: call trainer.fit inside `with "
                "mlflow.start_run():`, give the trainer an MLFlowLogger, or pass run_id=."
            )
        self.watcher = watch(pl_module, example, optimizer=optimizer, run_id=run_id, **self.graph)

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch 0: the untrained network, with the sanity check's validation metrics."""
        self.log_initial(trainer, VAL_METRICS)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch 0 without validation metrics, if no sanity check logged it."""
        self.log_initial(trainer, ())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch ``current_epoch + 1``: its training and validation metrics, and the graph.

        Lightning steps epoch-wise learning-rate schedulers after this hook, so ``lr`` is the
        rate the epoch trained with, as in ``train.py``.
        """
        if self.watcher is not None and not trainer.sanity_checking:
            # Lightning keeps the last validation's values: an epoch it did not validate
            # (check_val_every_n_epoch > 1) gets none, not the epoch before's
            validated = self.validated == trainer.current_epoch
            metrics = self.epoch_metrics(trainer, EPOCH_METRICS if validated else TRAIN_METRICS)
            self.watcher.log_epoch(trainer.current_epoch + 1, metrics)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note which epoch the validation metrics are of."""
        if not trainer.sanity_checking:
            self.validated = trainer.current_epoch

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``test_loss`` and ``test_acc`` at the last epoch logged."""
        if self.watcher is not None:
            self.watcher.log_test(self.epoch_metrics(trainer, TEST_METRICS))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``graph/dynamics.png``."""
        if self.watcher is not None:
            self.watcher.finish()

    def log_initial(self, trainer: pl.Trainer, names: tuple[str, ...]) -> None:
        """Log epoch 0 once."""
        if self.watcher is not None and self.watcher.last_epoch is None:
            self.watcher.log_epoch(0, self.epoch_metrics(trainer, names))

    def epoch_metrics(self, trainer: pl.Trainer, names: tuple[str, ...]) -> dict[str, float]:
        """Those of ``names`` the module logged, read from ``trainer.callback_metrics``."""
        logged = trainer.callback_metrics
        found: dict[str, float] = {}
        for name in names:
            key = self.names.get(name, name)
            for candidate in (key, f"{key}_epoch"):  # _epoch: logged on_step and on_epoch
                if candidate in logged:
                    found[name] = float(logged[candidate])
                    break
        return found


def logger_run_id(trainer: pl.Trainer) -> str | None:
    """The run of the trainer's ``MLFlowLogger`` when no MLflow run is active, else None.

    Asking the logger for its run makes it point MLflow at its tracking URI, where ``watch``
    then logs.
    """
    if mlflow.active_run() is not None:
        return None
    from lightning.pytorch.loggers import MLFlowLogger

    found = [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]
    return found[0].run_id if found else None
