"""The predictor's 80% interval, calibrated: conformalized quantile regression.

CatBoost's ``MultiQuantile`` intervals fit the runs they were fitted on, and come out far too
narrow for new runs: on 337 runs of the population (k=3, 600 trees, 3 held-out quarters of the
configurations) the 0.1..0.9 interval held 45%, 36% and 51% of the held-out runs, 0.037 wide
on average (``bench/predictor_uncertainty.py``). Widening both ends by the conformity quantile of
out-of-fold predictions on the training runs (Romano, Patterson and Candès 2019) gave 86%, 80%
and 88% (0.117 wide), without touching the point, at five more fits of the model per window
(each of its ``ensemble`` fits refitted in each fold) on the columns it kept. The widening
never narrows the quantiles.

Runs flagged out of distribution get a second widening (``outside_widening``). Folds of
configurations say how wrong the model is on configurations like the ones it learned from; a
run at a width or learning rate beyond the trained range is a different question, and the
first widening held 58% to 72% of the runs of the population's off-grid sweep, more than half
of them flagged. So a flagged run's interval is calibrated on folds that are themselves beyond
the range: the runs at the smallest width, at the largest, at the smallest learning rate and
at the largest, each predicted by the model refitted on the others (four more fits of the
model per window). With it, that sweep's coverage was 80%.
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
# the hyperparameters sweeps most often extend past their grid: the folds of outside_widening
OUTSIDE_HPARAMS = ("width", "log10_lr")


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
    return conformal(model, x, y, [fold == f for f in np.unique(fold)], cfg, nominal)


def outside_widening(
    model: Ensemble,
    x: pd.DataFrame,
    y: np.ndarray,
    hparams: pd.DataFrame,
    cfg: DictConfig,
    nominal: float,
) -> float:
    """``widening`` for runs outside the trained range: each fold lies beyond the others.

    The folds are the runs at each end of each ``OUTSIDE_HPARAMS`` hyperparameter (``hparams``:
    the training runs' ``hparam_features``, rows as in ``x``) that takes two values or more.
    Such folds are not exchangeable with a new run, so the nominal share is a target, not a
    guarantee; ``bench/out_of_population.py`` measures what it holds on a sweep off the grid.
    0 when no hyperparameter varies.
    """
    folds = []
    for name in OUTSIDE_HPARAMS:
        values = hparams[name].to_numpy(float)
        seen = np.unique(values[np.isfinite(values)])
        if len(seen) >= 2:
            folds += [values == seen[0], values == seen[-1]]
    return conformal(model, x, y, folds, cfg, nominal)


def conformal(
    model: Ensemble,
    x: pd.DataFrame,
    y: np.ndarray,
    folds: list[np.ndarray],
    cfg: DictConfig,
    nominal: float,
) -> float:
    """The ⌈(n + 1)·nominal⌉-th smallest conformity score of the runs of ``folds``, or 0.

    Each fold (a mask of the rows) is predicted by ``model`` refitted on the other rows; a
    run's score is how far its final accuracy lies outside its interval (negative inside).
    """
    scores = []
    for held in folds:
        if held.all() or not held.any():  # nothing to fit on, or nothing to score
            continue
        low, _, high = to_interval(refit(model, x[~held], y[~held], cfg).predict(x[held])).T
        scores.extend(np.maximum(low - y[held], y[held] - high))
    if not scores:
        return 0.0
    rank = min(len(scores), math.ceil((len(scores) + 1) * nominal))
    return float(max(np.sort(scores)[rank - 1], 0.0))
