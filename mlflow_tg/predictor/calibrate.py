"""The predictor's 80% interval, calibrated: conformalized quantile regression.

CatBoost's ``MultiQuantile`` intervals fit the runs they were fitted on, and come out far too
narrow for new runs: on 337 runs of the population (k=3, 600 trees, 3 held-out quarters of the
configurations) the 0.1..0.9 interval held 45%, 36% and 51% of the held-out runs, 0.037 wide
on average (``bench/predictor_uncertainty.py``). Widening both ends by the conformity quantile of
out-of-fold predictions on the training runs (Romano, Patterson and Candès 2019) gave 86%, 80%
and 88% (0.117 wide), without touching the point, at five more fits of the model per window
(each of its ``ensemble`` fits refitted in each fold) on the columns it kept. The widening
never narrows the quantiles.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from mlflow_tg.predictor.answering import to_interval
from mlflow_tg.predictor.ensemble import Ensemble
from mlflow_tg.predictor.evaluate import group_position
from mlflow_tg.predictor.fit import refit

FOLDS = 5


def widening(
    model: Ensemble,
    x: pd.DataFrame,
    y: np.ndarray,
    groups: list[str],
    cfg: DictConfig,
    nominal: float,
) -> float:
    """How far to move each end of ``model``'s interval out for ``nominal`` of new runs to fall in.

    The training runs are split into folds by configuration (seed-twins together); each fold is
    predicted by ``model`` refitted on the others (its columns, orders and seeds), and the
    conformity score of a run is how far its final accuracy lies outside its interval (negative
    inside). The widening is the
    ⌈(n + 1)·nominal⌉-th smallest score: with exchangeable runs, a new run's accuracy falls in
    the widened interval with probability ≥ nominal.
    """
    fold = np.array([int(group_position(group, cfg.seed + 1) * FOLDS) for group in groups])
    scores = []
    for f in np.unique(fold):
        held = fold == f
        if held.all():  # one configuration only: nothing to fit on
            continue
        low, _, high = to_interval(refit(model, x[~held], y[~held], cfg).predict(x[held])).T
        scores.extend(np.maximum(low - y[held], y[held] - high))
    if not scores:
        return 0.0
    rank = min(len(scores), math.ceil((len(scores) + 1) * nominal))
    return float(max(np.sort(scores)[rank - 1], 0.0))
