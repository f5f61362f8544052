"""Quality metrics against hand-worked values; grouped and width splits."""

from __future__ import annotations

import numpy as np
import pytest

from mlflow_tg.predictor.evaluate import (
    in_holdout,
    narrow_half,
    quality,
    quality_by_subset,
    seed_twin_agreement,
)


def test_quality_metrics():
    actual = np.array([0.1, 0.5, 0.9, 0.7])
    predicted = np.array([0.2, 0.4, 0.8, 0.9])
    scores = quality(actual, predicted)
    assert scores["mae_points"] == pytest.approx(12.5)  # (10 + 10 + 10 + 20) / 4
    sse, sst = 0.01 + 0.01 + 0.01 + 0.04, ((actual - actual.mean()) ** 2).sum()
    assert scores["r2"] == pytest.approx(1 - sse / sst)
    # pairs: 5 concordant, 1 discordant (0.9 > 0.7 but 0.8 < 0.9), no ties: (5 - 1) / 6
    assert scores["kendall_tau"] == pytest.approx(2 / 3)
    assert scores["spearman"] == pytest.approx(0.8)
    assert quality(actual, actual)["kendall_tau"] == pytest.approx(1.0)


def test_non_trivial_subset_drops_runs_that_never_learned():
    actual = np.array([0.1, 0.1, 0.6, 0.7, 0.9])
    predicted = np.array([0.0, 0.2, 0.9, 0.7, 0.6])
    by_subset = quality_by_subset(actual, predicted, nontrivial_above=0.5)
    assert by_subset["all"]["runs"] == 5 and by_subset["nontrivial"]["runs"] == 3
    assert by_subset["nontrivial"]["kendall_tau"] == pytest.approx(-1.0)


def test_holdout_keeps_seed_twins_together_and_is_stable():
    groups = [f"config{i}" for i in range(200) for _ in range(2)]
    held = in_holdout(groups, 0.25)
    assert (held[::2] == held[1::2]).all()  # both seeds of a configuration on one side
    assert 0.15 < held.mean() < 0.35
    # a configuration keeps its side when the population grows
    assert (in_holdout(groups + ["new"] * 2, 0.25)[:400] == held).all()
    assert not (in_holdout(groups, 0.25, seed=1) == held).all()


def test_narrow_half_of_the_widths():
    assert narrow_half([2, 4, 6, 8, 2, 8]).tolist() == [True, True, False, False, True, False]
    assert narrow_half([2, 4, 8]).tolist() == [True, False, False]
    assert not narrow_half([4, 4, 4]).any()  # one width: nothing to transfer from


def test_seed_twin_agreement():
    groups = ["a", "a", "b", "b", "c", "c", "d"]
    seeds = ["0", "1", "0", "1", "0", "1", "0"]
    accuracy = [0.9, 0.8, 0.5, 0.6, 0.1, 0.2, 0.4]
    agreement = seed_twin_agreement(groups, seeds, accuracy)
    assert agreement["configurations"] == 3  # d has no twin
    assert agreement["kendall_tau"] == pytest.approx(1.0)
    assert agreement["mean_abs_diff_points"] == pytest.approx(10.0)


def test_evaluations_score_the_point_the_registered_model_answers():
    """Quantiles that cross or leave [0, 1] are sorted and clipped before they are scored."""
    import pandas as pd

    from mlflow_tg.predictor.answering import to_interval
    from mlflow_tg.predictor.fit import predict

    raw = np.array([[0.9, 1.04, 1.1], [0.5, 0.3, 0.6], [0.2, 0.4, 0.35]])

    class Quantiles:  # the raw (low, median, high) of a MultiQuantile model
        def __init__(self):
            self.feature_names_ = ["a"]

        def predict(self, x: pd.DataFrame) -> np.ndarray:
            return raw

        def get_params(self) -> dict:
            return {"loss_function": "MultiQuantile:alpha=0.1,0.5,0.9"}

    points = predict(Quantiles(), pd.DataFrame({"a": [1.0, 2.0, 3.0]}))
    assert points.tolist() == pytest.approx([1.0, 0.5, 0.35])
    assert points.tolist() == to_interval(raw)[:, 1].tolist()
