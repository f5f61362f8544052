"""Figures logged to MLflow runs."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # runs happen on servers and in CI: never open a window

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def trajectory_figure(
    trajectory: Sequence[dict[str, float]], centralities: Sequence[str], stats: Sequence[str]
) -> Figure:
    """One panel per centrality: each summary statistic over the captured epochs."""
    epochs = [row["epoch"] for row in trajectory]
    figure, axes = plt.subplots(
        1, len(centralities), figsize=(4 * len(centralities), 3.2), squeeze=False
    )
    for axis, name in zip(axes[0], centralities, strict=True):
        for stat in stats:
            key = f"tg.{name}.{stat}"
            if key in trajectory[0]:
                axis.plot(
                    epochs, [row.get(key, float("nan")) for row in trajectory], "o-", label=stat
                )
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.legend(fontsize="small")
    figure.suptitle("Graph dynamics: centrality summaries per epoch (epoch 0 = initialisation)")
    figure.tight_layout()
    plt.close(figure)  # MLflow renders it; keep pyplot's registry from growing
    return figure
