"""What the training loop offers to the steps that watch it: graph capture, live prediction.

The loop knows nothing of those steps. After each epoch's evaluation it hands every hook the
epoch (its number, the model, the metrics so far) in order; a hook adds metrics, which go out
with the epoch's own in one batch call, and may ask training to stop after this epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from mlflow_tg.tracking.run import RunLogger


@dataclass
class Epoch:
    """One epoch as hooks see it (epoch 0: the initialised network, before any training)."""

    number: int
    model: nn.Module
    metrics: dict[str, float]  # this epoch's metrics so far; each hook adds its own
    history: list[dict[str, float]] = field(default_factory=list)  # earlier epochs, as logged
    stop: str | None = None  # set by a hook: why training should end after this epoch


class EpochHook(Protocol):
    """A step that runs after each epoch of a training run and once at its end."""

    def on_epoch(self, epoch: Epoch, run: RunLogger) -> None:
        """Look at the epoch; add metrics to ``epoch.metrics`` or set ``epoch.stop``."""

    def on_end(self, run: RunLogger) -> None:
        """Log what needs the whole run (a figure, a summary)."""
