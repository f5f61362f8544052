"""Figures of the predictor's quality, logged with its fit."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # runs happen on servers and in CI: never open a window

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def predicted_vs_actual_figure(actual, predictions: dict[str, Sequence[float]]) -> Figure:
    """One scatter per predictor: its score of each held-out run against the final accuracy."""
    figure, axes = plt.subplots(
        1, len(predictions), figsize=(4.2 * len(predictions), 4), squeeze=False
    )
    for axis, (label, predicted) in zip(axes[0], predictions.items(), strict=True):
        axis.scatter(actual, predicted, s=12, alpha=0.7)
        axis.plot([0, 1], [0, 1], color="grey", lw=0.8)
        axis.set_xlabel("final test accuracy")
        axis.set_ylabel("prediction")
        axis.set_title(label, fontsize="medium")
    figure.suptitle("Held-out runs: prediction against final accuracy")
    figure.tight_layout()
    plt.close(figure)
    return figure


def importance_figure(importance) -> Figure:
    """Horizontal bars of the most important features (a polars frame: feature, importance)."""
    names, values = importance["feature"].to_list(), importance["importance"].to_list()
    figure, axis = plt.subplots(figsize=(7, 0.28 * len(names) + 1))
    axis.barh(names[::-1], values[::-1])
    axis.set_xlabel("CatBoost importance (prediction change)")
    axis.tick_params(axis="y", labelsize="small")
    figure.tight_layout()
    plt.close(figure)
    return figure
