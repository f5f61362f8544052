"""Several CatBoost fits of one window, averaged: the predictor's model.

One fit's ranking of new runs depends on chance that has nothing to do with the runs: its seed
and the order of its columns. On the harder population (k = 3, graph+curve+hparams, five fits
of the same selected columns, ``bench/ensemble.py``), Kendall τ on the out-of-population sweep
ranged 0.716-0.766 from fit to fit and in width transfer 0.484-0.578. The mean of the fits'
quantiles ranked better than their average fit under every protocol and set measured there
(out of population 0.763 against 0.738, width transfer 0.566 against 0.537); on the 384-run
population, in cross-validation and out of population but not in width transfer. Fitting the
five fits again alone took 7 s a fit there, where the whole ensemble, selection included, took
197 s.

Members are CatBoost regressors on the same columns, each in its own order and with its own
seed; the ensemble reads the first member's column order, and its output is the mean of the
members' outputs (for a ``MultiQuantile`` model, each quantile averaged). CatBoost is not
imported here: ``mlflow-tg predict`` loads members only where it answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


class Ensemble:
    """Fits averaged; reads, predicts and reports importances as one CatBoost model does."""

    def __init__(self, members: Sequence[Any]):
        if not members:
            raise ValueError("an ensemble needs at least one fitted model")
        self.members = list(members)
        self.feature_names_ = list(self.members[0].feature_names_)
        position = {column: i for i, column in enumerate(self.feature_names_)}
        if any(sorted(m.feature_names_) != sorted(self.feature_names_) for m in self.members):
            raise ValueError("the members of an ensemble must read the same columns")
        # each member's columns as positions in the ensemble's order: rows come as arrays too
        self._positions = [[position[c] for c in m.feature_names_] for m in self.members]

    def predict(self, x: pd.DataFrame | np.ndarray) -> np.ndarray:
        """The members' mean output; ``x`` holds the ensemble's columns (a frame: by name)."""
        outputs = []
        for member, positions in zip(self.members, self._positions, strict=True):
            if isinstance(x, pd.DataFrame):
                rows = x[member.feature_names_]
            else:
                rows = np.asarray(x)[:, positions]
            outputs.append(np.asarray(member.predict(rows), float))
        return np.mean(outputs, axis=0)

    def get_params(self) -> dict[str, Any]:
        """The first member's parameters (the members differ only in seed and column order)."""
        return self.members[0].get_params()

    def get_feature_importance(self) -> np.ndarray:
        """Each column's importance, averaged over the members, in the ensemble's order."""
        importance = np.zeros(len(self.feature_names_))
        for member, positions in zip(self.members, self._positions, strict=True):
            importance[positions] += member.get_feature_importance()
        return importance / len(self.members)

    def save(self, folder: Path, stem: str) -> dict[str, str]:
        """Write each member as ``stem.cbm``, ``stem_1.cbm``, …; their paths by artifact name."""
        paths = {}
        for i, member in enumerate(self.members):
            name = member_name(stem, i)
            paths[name] = str(folder / f"{name}.cbm")
            member.save_model(paths[name])
        return paths

    @classmethod
    def load(cls, artifacts: Mapping[str, str], stem: str) -> Ensemble:
        """The members saved under ``stem`` (a version with one model has ``stem`` alone)."""
        from catboost import CatBoostRegressor

        if stem not in artifacts:
            raise KeyError(f"no artifact {stem!r} among the version's {sorted(artifacts)}")
        members, i = [], 0
        while (name := member_name(stem, i)) in artifacts:
            members.append(CatBoostRegressor().load_model(artifacts[name]))
            i += 1
        return cls(members)


def member_name(stem: str, i: int) -> str:
    """The artifact name of member ``i``: the first keeps the single model's name."""
    return stem if i == 0 else f"{stem}_{i}"
