"""Pruning policies: whether a job of a sweep should stop now, given what its mates showed.

Pure functions of what a run and its mates logged, so the same code decides inside a live
training job (``hook.py``) and in the replay benchmark (``bench/pruning.py``).

- ``predicted`` (ours): stop when even the optimistic end of the run's predicted final
  accuracy (the upper bound of the predictor's 80% interval) falls below the ``quantile`` of
  what its mates are expected to reach (a mate's final accuracy once it completed its budget,
  else its latest prediction), once at least ``warmup`` mates have such an estimate. The
  interval is what makes this safe early: a prediction from one epoch is wide, and a run is
  only dropped when its whole plausible range lies below the bar. A version with a window k=0
  answers before any training; there the bar is the lower of ``quantile_before_training`` and
  ``quantile``.
- ``median`` (reference, the median rule of Golovin et al. 2017 that Optuna's ``MedianPruner``
  implements): stop when the run's ``val_acc`` at this epoch is below the median of its mates'
  ``val_acc`` at the same epoch, once ``warmup`` mates reached it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class RunView:
    """What a pruning policy may know of one run of the sweep."""

    val_acc: dict[int, float] = field(default_factory=dict)  # by epoch
    predicted: float | None = None  # latest prediction of the final test accuracy
    predicted_high: float | None = None  # upper end of its 80% interval
    final: float | None = None  # final test accuracy, once the run completed its full budget

    @property
    def expected(self) -> float | None:
        """The best estimate of where the run ends: its final accuracy, else its prediction."""
        return self.final if self.final is not None else self.predicted


class Policy(Protocol):
    """Decides, after an epoch, whether a run should stop; returns why, or None."""

    def ready(self, epoch: int, run: RunView) -> bool:
        """Whether the run has what a decision after ``epoch`` reads (if not, mates go unread)."""

    def decide(self, epoch: int, run: RunView, mates: list[RunView]) -> str | None:
        """The reason to stop the run after ``epoch``, or None to go on."""


@dataclass(frozen=True)
class PredictedPolicy:
    """Stop when the interval's upper end lies below the mates' ``quantile`` (module doc)."""

    quantile: float = 0.75
    warmup: int = 5
    # epoch 0 (a version with a window 0 answers before any training): from the configuration
    # and the initialisation alone it misreads more good runs, so a bar never above the later
    # one (the lower of the two quantiles); None: quantile
    quantile_before_training: float | None = 0.5

    def ready(self, epoch: int, run: RunView) -> bool:
        """A prediction from this epoch (epoch 0 too, when the version has a window 0)."""
        return run.predicted_high is not None

    def decide(self, epoch: int, run: RunView, mates: list[RunView]) -> str | None:
        """Compare the optimistic prediction with the mates' expected accuracies."""
        if not self.ready(epoch, run):
            return None
        expected = [mate.expected for mate in mates if mate.expected is not None]
        if len(expected) < self.warmup:
            return None
        quantile = self.quantile
        if epoch == 0 and self.quantile_before_training is not None:
            quantile = min(quantile, self.quantile_before_training)
        bar = float(np.quantile(expected, quantile))
        if run.predicted_high < bar:
            return (
                f"predicted final accuracy at most {run.predicted_high:.3f} (80% interval's "
                f"upper end) is below {bar:.3f}, the {quantile:g} quantile of "
                f"{len(expected)} sweep-mates"
            )
        return None


@dataclass(frozen=True)
class MedianPolicy:
    """Stop when ``val_acc`` is below the mates' median at the same epoch (module doc)."""

    warmup: int = 5
    min_epoch: int = 1

    def ready(self, epoch: int, run: RunView) -> bool:
        """A validation accuracy at this epoch, from ``min_epoch`` on."""
        return epoch >= self.min_epoch and epoch in run.val_acc

    def decide(self, epoch: int, run: RunView, mates: list[RunView]) -> str | None:
        """Compare this epoch's validation accuracy with the mates' at the same epoch."""
        if not self.ready(epoch, run):
            return None
        reached = [mate.val_acc[epoch] for mate in mates if epoch in mate.val_acc]
        if len(reached) < self.warmup:
            return None
        median = float(np.median(reached))
        if run.val_acc[epoch] < median:
            return (
                f"val_acc {run.val_acc[epoch]:.3f} at epoch {epoch} is below the median "
                f"{median:.3f} of {len(reached)} sweep-mates at that epoch"
            )
        return None


def make_policy(cfg: Any) -> Policy:
    """The policy a ``prune`` config names (``policy: predicted`` or ``median``)."""
    if cfg.policy == "predicted":
        return PredictedPolicy(
            quantile=cfg.quantile,
            warmup=cfg.warmup,
            quantile_before_training=cfg.quantile_before_training,
        )
    if cfg.policy == "median":
        return MedianPolicy(warmup=cfg.warmup, min_epoch=cfg.min_epoch)
    raise ValueError(f"prune.policy={cfg.policy!r}: choose off, predicted or median")
