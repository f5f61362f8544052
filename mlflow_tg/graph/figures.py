"""The figure of a run's graph dynamics, logged at the end of the run."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # runs happen on servers and in CI: never open a window

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from mlflow_tg.graph.summaries import DEPTH_BUCKETS
from mlflow_tg.keys import EPOCH, graph_metric

GLOBAL_LINES = ("mean", "std", "q90", "max", "gini")
DEPTH_LINES = tuple(f"depth{bucket}.mean" for bucket in range(DEPTH_BUCKETS))


def trajectory_figure(
    trajectory: Sequence[dict[str, float]], centralities: Sequence[str]
) -> Figure:
    """Each centrality's summaries over the captured epochs, relative to their initial value.

    Statistics differ by orders of magnitude between centralities and graph sizes; divided by
    their value at the first capture (epoch 0, the initialisation) they share one axis and show
    what training changed. Top row: global statistics; bottom row: mean per depth quartile.
    """
    epochs = [row[EPOCH] for row in trajectory]
    figure, axes = plt.subplots(
        2, len(centralities), figsize=(4 * len(centralities), 6), squeeze=False, sharex=True
    )
    for column, name in enumerate(centralities):
        for axis, lines in zip(axes[:, column], (GLOBAL_LINES, DEPTH_LINES), strict=True):
            for stat in lines:
                values = [row.get(graph_metric(name, stat), math.nan) for row in trajectory]
                if values[0] and math.isfinite(values[0]):
                    axis.plot(epochs, [v / values[0] for v in values], "o-", ms=3, label=stat)
            axis.axhline(1.0, color="grey", lw=0.5)
            axis.legend(fontsize="x-small")
        axes[0, column].set_title(name)
        axes[1, column].set_xlabel("epoch")
    axes[0, 0].set_ylabel("global statistic / epoch 0")
    axes[1, 0].set_ylabel("mean by depth quartile / epoch 0")
    figure.suptitle("Graph dynamics: centrality summaries relative to the initialisation")
    figure.tight_layout()
    plt.close(figure)  # MLflow renders it; keep pyplot's registry from growing
    return figure
