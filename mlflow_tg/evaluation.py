"""How well predictions rank and match final accuracies, on runs a model never saw.

Splits are by training configuration (the ``mlflow_tg.config_id`` tag, which ignores the seed),
so seed-twins never sit on both sides: otherwise a model could look up a twin's accuracy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from scipy import stats

QUALITY_METRICS = ("r2", "mae_points", "spearman", "kendall_tau")


def quality(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """R², mean absolute error in accuracy points, Spearman ρ and Kendall τ (τ-b)."""
    actual, predicted = np.asarray(actual, float), np.asarray(predicted, float)
    if len(actual) < 3:
        return dict.fromkeys(QUALITY_METRICS, float("nan")) | {"runs": float(len(actual))}
    spread = ((actual - actual.mean()) ** 2).sum()
    return {
        "r2": float(1 - ((actual - predicted) ** 2).sum() / spread) if spread else float("nan"),
        "mae_points": float(100 * np.abs(actual - predicted).mean()),
        "spearman": float(stats.spearmanr(actual, predicted).statistic),
        "kendall_tau": float(stats.kendalltau(actual, predicted).statistic),
        "runs": float(len(actual)),
    }


def quality_by_subset(
    actual: np.ndarray, predicted: np.ndarray, nontrivial_above: float
) -> dict[str, dict[str, float]]:
    """Quality on all runs and on the non-trivial ones (final accuracy above a threshold).

    A population mixes runs that never learn with runs that do; on all runs, most of any score
    is telling the two apart, so the ranking among learning runs is reported on its own.
    """
    actual, predicted = np.asarray(actual, float), np.asarray(predicted, float)
    learned = actual > nontrivial_above
    return {
        "all": quality(actual, predicted),
        "nontrivial": quality(actual[learned], predicted[learned]),
    }


def group_position(group: str, seed: int = 0) -> float:
    """A configuration's fixed place in [0, 1), from a hash of its id."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_holdout(groups: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """Which runs are held out: a fixed share of configurations, chosen by hashing them.

    A hash, not a random draw: a configuration stays on its side as the population grows, so
    models fitted at different times are compared on the same held-out runs.
    """
    return np.array([group_position(group, seed) < fraction for group in groups], dtype=bool)


def grouped_folds(groups: Sequence[str], folds: int, seed: int = 0) -> np.ndarray:
    """The cross-validation fold of each run; seed-twins share one."""
    return np.array([int(group_position(group, seed) * folds) for group in groups])


def narrow_half(widths: Sequence[float]) -> np.ndarray:
    """Which runs have a width in the narrower half of the distinct widths (for transfer)."""
    distinct = sorted(set(widths))
    narrow = set(distinct[: len(distinct) // 2])
    return np.array([width in narrow for width in widths], dtype=bool)


def seed_twin_agreement(
    groups: Sequence[str], seeds: Sequence[str], accuracy: Sequence[float]
) -> dict[str, float]:
    """Kendall τ between two seeds' final accuracies over the configurations that have both.

    The noise ceiling: no predictor ranks single runs much better than a configuration's own
    twin predicts it.
    """
    by_group: dict[str, dict[str, float]] = {}
    for group, seed, value in zip(groups, seeds, accuracy, strict=True):
        by_group.setdefault(group, {})[seed] = value
    pairs = [sorted(runs.items())[:2] for runs in by_group.values() if len(runs) >= 2]
    first = np.array([pair[0][1] for pair in pairs])
    second = np.array([pair[1][1] for pair in pairs])
    return {
        "configurations": float(len(pairs)),
        "kendall_tau": float(stats.kendalltau(first, second).statistic) if pairs else np.nan,
        "mean_abs_diff_points": float(100 * np.abs(first - second).mean()) if pairs else np.nan,
    }
