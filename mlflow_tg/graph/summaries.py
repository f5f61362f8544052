"""Centralities per vertex → a per-vertex table, a per-layer table and compact summary metrics.

Summary metric keys (the MLflow UI draws one chart per key, so they stay few; every per-vertex
and per-layer detail lives in the parquet tables instead), for each centrality ``C``:

- ``tg.C/{mean,std,min,q10,q50,q90,max}`` over all vertices;
- ``tg.C/gini``: Gini coefficient of the values (0 = all equal, → 1 = one vertex holds all);
- ``tg.C/entropy``: Shannon entropy of the values normalised to sum 1, divided by log(vertices)
  (1 = uniform), so graphs of different sizes compare;
- ``tg.C/depth{0..3}.{mean,gini}``: the same over the vertices of each depth quartile, layers
  being numbered in data-flow order (depth0 holds the input, depth3 the classifier);

plus ``tg.graph/vertices`` and ``tg.graph/edges``: 121 keys with all seven centralities, 53
with the default three.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import stats

from mlflow_tg.keys import GRAPH_SIZE, graph_metric

GLOBAL_STATS = ("mean", "std", "min", "q10", "q50", "q90", "max", "gini", "entropy")
DEPTH_BUCKETS = 4
NODE_COLUMNS = ("node", "layer", "layer_index", "kind", "channel")


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0 when they are all zero)."""
    total = values.sum()
    if total <= 0:
        return 0.0
    ordered = np.sort(values)
    ranks = np.arange(1, len(values) + 1)
    return float(((2 * ranks - len(values) - 1) * ordered).sum() / (len(values) * total))


def normalised_entropy(values: np.ndarray) -> float:
    """Entropy of ``values / sum`` over log(n): 1 for uniform values, 0 for one non-zero."""
    if len(values) < 2 or values.sum() <= 0:
        return 0.0
    return float(stats.entropy(values, base=len(values)))  # normalises to sum 1, 0 log 0 = 0


def statistics(values: np.ndarray) -> dict[str, float]:
    """``GLOBAL_STATS`` of one array of centrality values."""
    q10, q50, q90 = np.quantile(values, [0.1, 0.5, 0.9])
    return {
        "mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
        "q10": float(q10), "q50": float(q50), "q90": float(q90), "max": float(values.max()),
        "gini": gini(values), "entropy": normalised_entropy(values),
    }  # fmt: skip


def node_table(nodes: pl.DataFrame, centralities: dict[str, np.ndarray]) -> pl.DataFrame:
    """One row per vertex: its labels (``NODE_COLUMNS``) and every centrality."""
    return nodes.with_columns(
        pl.Series(name, values, dtype=pl.Float64) for name, values in centralities.items()
    )


def centrality_columns(nodes: pl.DataFrame) -> list[str]:
    """The centrality columns of a node table."""
    return [column for column in nodes.columns if column not in NODE_COLUMNS]


def layer_table(nodes: pl.DataFrame) -> pl.DataFrame:
    """One row per layer: its vertices and the mean, std, max and sum of each centrality."""
    aggregates = [pl.len().alias("vertices")]
    for name in centrality_columns(nodes):
        column = pl.col(name)
        aggregates += [
            column.mean().alias(f"{name}_mean"),
            column.std(ddof=0).alias(f"{name}_std"),
            column.max().alias(f"{name}_max"),
            column.sum().alias(f"{name}_sum"),
        ]
    return (
        nodes.group_by("layer_index", "layer", "kind", maintain_order=True)
        .agg(aggregates)
        .sort("layer_index")
    )


def depth_buckets(layer_index: np.ndarray) -> np.ndarray:
    """Depth quartile of each vertex from its layer's position in data-flow order."""
    layers = layer_index.max() + 1
    return np.minimum(layer_index * DEPTH_BUCKETS // layers, DEPTH_BUCKETS - 1)


def summary_metrics(nodes: pl.DataFrame, edges: int) -> dict[str, float]:
    """The ``tg.*`` metrics of one snapshot (keys in the module docstring)."""
    metrics = {
        graph_metric(GRAPH_SIZE, "vertices"): float(nodes.height),
        graph_metric(GRAPH_SIZE, "edges"): float(edges),
    }
    buckets = depth_buckets(nodes["layer_index"].to_numpy())
    for name in centrality_columns(nodes):
        values = nodes[name].to_numpy()
        metrics |= {graph_metric(name, stat): value for stat, value in statistics(values).items()}
        for bucket in range(DEPTH_BUCKETS):
            inside = values[buckets == bucket]
            if len(inside):  # empty only for networks of fewer than four layers
                metrics[graph_metric(name, f"depth{bucket}.mean")] = float(inside.mean())
                metrics[graph_metric(name, f"depth{bucket}.gini")] = gini(inside)
    return metrics
