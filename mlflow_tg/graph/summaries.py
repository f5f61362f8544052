"""Centralities per vertex → a per-vertex table, a per-layer table and compact summary metrics.

Summary metric keys (the MLflow UI draws one chart per key, so they stay few; every per-vertex
and per-layer detail lives in the parquet tables instead), for each centrality ``C``:

- ``tg.C/{mean,std,min,q10,q50,q90,max}`` over all vertices;
- ``tg.C/gini``: Gini coefficient of the values (0 = all equal, → 1 = one vertex holds all);
- ``tg.C/entropy``: Shannon entropy of the values normalised to sum 1, divided by log(vertices)
  (1 = uniform), so graphs of different sizes compare;
- ``tg.C/depth{0..3}.{mean,gini}``: the same over the vertices of each depth quartile, layers
  being numbered in data-flow order (depth0 holds the input, depth3 the classifier);

and three that do not shift with the network's width or depth, so that what is learned on
narrow networks can be read on wide ones:

- ``tg.C/participation``: ``(Σ c²)² / (N Σ c⁴)``, the share of the vertices the values are spread
  over (1 = uniform, 1/N = one vertex; for the eigenvector, one over N times its inverse
  participation ratio, the usual measure of an eigenvector's localisation);
- ``tg.C/profile.entropy`` and ``tg.C/profile.centroid``: how the centrality's total is shared
  out over the layers: the entropy of the layers' shares over log(layers), and their centre
  of mass in depth (0 = the input layer, 1 = the last layer);

plus ``tg.strength/growth.{mean,depthslope}``: the log ratio of each layer's mean strength to
the same layer's at the run's first capture, averaged over the layers, and its least-squares
slope against depth (> 0: the deep layers grew more); ``tg.eigenvector/radius``: the spectral
radius λ_max of W, when the eigenvector is computed; and ``tg.graph/vertices`` and
``tg.graph/edges``. That is 145 keys with all seven centralities, 65 with the default three.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import stats

from mlflow_tg.keys import GRAPH_SIZE, graph_metric

GLOBAL_STATS = ("mean", "std", "min", "q10", "q50", "q90", "max", "gini", "entropy")
SCALE_FREE_STATS = ("participation", "profile.entropy", "profile.centroid")
GROWN = "strength"  # the centrality whose level grows with the weights
GROWTH_STATS = ("growth.mean", "growth.depthslope")
RADIUS = ("eigenvector", "radius")
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


def participation(values: np.ndarray) -> float:
    """``(Σ v²)² / (N Σ v⁴)``: 1 for equal values, 1/N for one non-zero, 0 for all zero."""
    squares = values.astype(np.float64) ** 2
    fourth = (squares**2).sum()
    return float(squares.sum() ** 2 / (len(values) * fourth)) if fourth > 0 else 0.0


def layer_depth(layers: pl.DataFrame) -> np.ndarray:
    """Each layer's position in data-flow order, 0 (input) to 1 (last layer)."""
    index = layers["layer_index"].to_numpy().astype(np.float64)
    return index / index.max() if index.max() > 0 else np.zeros_like(index)


def profile(layers: pl.DataFrame, name: str) -> dict[str, float]:
    """Entropy (over log(layers)) and depth centroid of the layers' shares of a centrality."""
    totals = layers[f"{name}_sum"].to_numpy()
    if totals.sum() <= 0:
        return {"profile.entropy": 0.0, "profile.centroid": 0.0}
    shares = totals / totals.sum()
    return {
        "profile.entropy": normalised_entropy(shares),
        "profile.centroid": float((layer_depth(layers) * shares).sum()),
    }


def growth(layers: pl.DataFrame, first: pl.DataFrame) -> dict[str, float]:
    """Mean over layers of log(mean strength now / at the first capture), and its depth slope.

    Layers without strength at either capture (nothing to compare) are left out.
    """
    now, then = layers["strength_mean"].to_numpy(), first["strength_mean"].to_numpy()
    both = (now > 0) & (then > 0)
    if not both.any():
        return {"growth.mean": 0.0, "growth.depthslope": 0.0}
    ratio = np.log(now[both] / then[both])
    depth = layer_depth(layers)[both]
    spread = ((depth - depth.mean()) ** 2).sum()
    slope = ((depth - depth.mean()) * (ratio - ratio.mean())).sum() / spread if spread else 0.0
    return {"growth.mean": float(ratio.mean()), "growth.depthslope": float(slope)}


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


def summary_metrics(
    nodes: pl.DataFrame,
    layers: pl.DataFrame,
    edges: int,
    first_layers: pl.DataFrame | None = None,
    spectral_radius: float | None = None,
) -> dict[str, float]:
    """The ``tg.*`` metrics of one snapshot (keys in the module docstring).

    ``layers``: ``layer_table(nodes)``, which the caller also logs. ``first_layers``: the layer
    table of the run's first capture, which growth compares with (None: this is the first
    capture, so no layer has grown). ``spectral_radius``: λ_max of W.
    """
    metrics = {
        graph_metric(GRAPH_SIZE, "vertices"): float(nodes.height),
        graph_metric(GRAPH_SIZE, "edges"): float(edges),
    }
    buckets = depth_buckets(nodes["layer_index"].to_numpy())
    for name in centrality_columns(nodes):
        values = nodes[name].to_numpy()
        metrics |= {graph_metric(name, stat): value for stat, value in statistics(values).items()}
        scale_free = {"participation": participation(values)} | profile(layers, name)
        metrics |= {graph_metric(name, stat): value for stat, value in scale_free.items()}
        for bucket in range(DEPTH_BUCKETS):
            inside = values[buckets == bucket]
            if len(inside):  # empty only for networks of fewer than four layers
                metrics[graph_metric(name, f"depth{bucket}.mean")] = float(inside.mean())
                metrics[graph_metric(name, f"depth{bucket}.gini")] = gini(inside)
    if GROWN in centrality_columns(nodes):
        changed = growth(layers, layers if first_layers is None else first_layers)
        metrics |= {graph_metric(GROWN, stat): value for stat, value in changed.items()}
    if spectral_radius is not None:
        metrics[graph_metric(*RADIUS)] = float(spectral_radius)
    return metrics
