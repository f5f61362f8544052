"""How well predictions rank and match final accuracies, on runs a model never saw.

Splits are by training configuration (the ``mlflow_tg.config_id`` tag, which ignores the seed),
so seed-twins never sit on both sides: otherwise a model could look up a twin's accuracy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import polars as pl
from omegaconf import DictConfig
from scipy import stats
from sklearn.metrics import mean_absolute_error, r2_score

from mlflow_tg.predictor.dataset import Dataset
from mlflow_tg.predictor.ensemble import Ensemble
from mlflow_tg.predictor.features import columns_of
from mlflow_tg.predictor.fit import fit_and_score
from mlflow_tg.tracking.runs import TARGET

QUALITY_METRICS = ("r2", "mae_points", "spearman", "kendall_tau")
BASELINE = "val_acc@k"
# training speed (Ru et al. 2021): a ranking score, not an accuracy, so its R² and MAE mean nothing
SPEED_BASELINE = "-train_loss.sum"


def quality(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """R², mean absolute error in accuracy points, Spearman ρ and Kendall τ (τ-b)."""
    actual, predicted = np.asarray(actual, float), np.asarray(predicted, float)
    if len(actual) < 3:
        return dict.fromkeys(QUALITY_METRICS, float("nan")) | {"runs": float(len(actual))}
    # sklearn refuses non-finite input (a baseline's missing value: NaN, or -inf to rank last)
    # and says 0 or 1 for the R² of a constant target: both are NaN here (-inf gave ±inf before).
    finite = bool(np.isfinite(predicted).all())
    defined = finite and np.ptp(actual) > 0
    return {
        "r2": float(r2_score(actual, predicted)) if defined else float("nan"),
        "mae_points": float(100 * mean_absolute_error(actual, predicted)) if finite else np.nan,
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


@dataclass
class Comparison:
    """Quality of each feature set (and the baselines), and the registered set's held-out fit."""

    quality: dict[str, dict[str, dict[str, dict[str, float]]]]  # set → split → subset → scores
    fits: dict[str, tuple[Ensemble, np.ndarray]]  # set → model, held-out predictions
    registered: str  # the set the registered version uses
    choice: str  # why: asked for, or the held-out evidence that chose it
    transfer: str  # which widths the transfer split fits on and scores, or why there is none

    @property
    def model(self) -> Ensemble:
        """The registered set's model, fitted without the held-out configurations."""
        return self.fits[self.registered][0]

    @property
    def predictions(self) -> np.ndarray:
        """Its predictions of the held-out runs."""
        return self.fits[self.registered][1]

    @cached_property
    def table(self) -> pl.DataFrame:
        """One row per feature set (or baseline), split and subset."""
        return pl.DataFrame(
            [
                {"features": sets, "split": split, "subset": subset} | scores
                for sets, splits in self.quality.items()
                for split, subsets in splits.items()
                for subset, scores in subsets.items()
            ]
        )


SELECT_ON = ("holdout", "holdout_and_transfer")


def best_set(
    quality: dict[str, dict[str, dict[str, dict[str, float]]]],
    sets: list[str],
    metric: str,
    select_on: str = "holdout",
) -> tuple[str, str]:
    """The set with the best ``metric`` on all runs, and the evidence in words.

    ``select_on="holdout"`` scores each set on the held-out configurations;
    ``"holdout_and_transfer"`` by the lower of that and its width-transfer score, so that a set
    must also read networks wider than it was fitted on (held-out alone where there is no
    transfer split). Ties go to the set listed first; a NaN score never wins.
    """
    held = {name: quality[name]["holdout"]["all"][metric] for name in sets}
    scores = held
    if select_on == "holdout_and_transfer":
        moved = {name: quality[name]["transfer"]["all"][metric] for name in sets}
        # min(NaN, x) is NaN: a set without a held-out score still never wins
        scores = {name: held[name] if np.isnan(moved[name]) else min(held[name], moved[name])
                  for name in sets}  # fmt: skip
    ranked = sorted(sets, key=lambda name: -np.nan_to_num(scores[name], nan=-np.inf))
    if select_on == "holdout":
        evidence = ", ".join(f"{name} {scores[name]:.3f}" for name in ranked)
        return ranked[0], f"best held-out {metric} on all runs ({evidence})"
    evidence = ", ".join(
        f"{name} {scores[name]:.3f} (held out {held[name]:.3f}, transfer {moved[name]:.3f})"
        for name in ranked
    )
    return ranked[0], f"best lower of held-out and width-transfer {metric} on all runs ({evidence})"


def transfer_split(widths: list[float]) -> tuple[np.ndarray, str]:
    """The narrow-width rows to fit on, and the split in words ('not available: …' if none)."""
    narrow = narrow_half(widths)
    distinct = sorted(set(widths))
    if not narrow.any():  # one width: no narrower half to fit on
        return narrow, f"not available: it needs 2 distinct widths, the runs have {distinct}"
    fitted = sorted({width for width, kept in zip(widths, narrow, strict=True) if kept})
    return narrow, f"fitted on widths {fitted}, scored on the wider ones"


def compare(
    dataset: Dataset,
    cfg: DictConfig,
    holdout: np.ndarray,
    compared: list[str],
    registered: str | None = None,
) -> Comparison:
    """Held-out and width-transfer quality of each set, and of ranking by ``val_acc@k``.

    ``registered``: the set the registered version uses; None chooses the compared set with
    the best ``cfg.selection_metric`` on ``cfg.select_on`` (see ``best_set``).
    """
    narrow, transfer = transfer_split(dataset.frame["run_width"].to_list())
    wide = ~narrow if narrow.any() else narrow  # no transfer: no rows, NaN scores
    y = dataset.column(TARGET)

    def scored(predicted_holdout, predicted_wide) -> dict[str, dict[str, dict[str, float]]]:
        return {
            "holdout": quality_by_subset(y[holdout], predicted_holdout, cfg.nontrivial_above),
            "transfer": quality_by_subset(y[wide], predicted_wide, cfg.nontrivial_above),
        }

    qualities, fits = {}, {}
    for sets in compared:
        columns = columns_of(dataset.feature_columns, sets)
        fits[sets] = fit_and_score(dataset, columns, ~holdout, cfg)
        transferred = fit_and_score(dataset, columns, narrow, cfg)[1] if wide.any() else y[wide]
        qualities[sets] = scored(fits[sets][1], transferred)
    baseline = dataset.column(f"val_acc@{cfg.k}")
    qualities[BASELINE] = scored(baseline[holdout], baseline[wide])
    if cfg.k >= 1:  # less loss over epochs 1..k ranks first; a run without it ranks last
        speed = np.nan_to_num(-dataset.column("train_loss.sum"), nan=-np.inf)
        qualities[SPEED_BASELINE] = scored(speed[holdout], speed[wide])
        for subsets in qualities[SPEED_BASELINE].values():
            for scores in subsets.values():
                scores["r2"] = scores["mae_points"] = float("nan")
    if registered is None:
        registered, choice = best_set(qualities, compared, cfg.selection_metric, cfg.select_on)
    else:
        choice = "asked for (feature_sets)"
    return Comparison(qualities, fits, registered, choice, transfer)


def metric_key(row: dict[str, Any], metric: str) -> str:
    """``holdout/graph_curve_hparams/all/kendall_tau`` ('+' and '@' are not allowed in keys)."""
    features = row["features"].replace("+", "_").replace("@", "_at_").replace("-", "minus_")
    return f"{row['split']}/{features}/{row['subset']}/{metric}"
