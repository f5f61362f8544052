"""Summary statistics against values worked out by hand, and the documented metric keys."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mlflow_tg.graph.centrality import CENTRALITIES
from mlflow_tg.graph.summaries import (
    GLOBAL_STATS,
    depth_buckets,
    gini,
    layer_table,
    node_table,
    normalised_entropy,
    summary_metrics,
)


def test_gini_of_known_distributions():
    assert gini(np.ones(5)) == pytest.approx(0.0)
    assert gini(np.array([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.75)  # (n - 1) / n
    # 1, 2, 3: mean absolute difference 8/9 over twice the mean 4 → 2/9
    assert gini(np.array([3.0, 1.0, 2.0])) == pytest.approx(2 / 9)
    assert gini(np.zeros(3)) == 0.0


def test_normalised_entropy_of_known_distributions():
    assert normalised_entropy(np.full(8, 0.3)) == pytest.approx(1.0)
    assert normalised_entropy(np.array([0.0, 0.0, 5.0])) == pytest.approx(0.0)
    p = np.array([0.5, 0.25, 0.25])
    assert normalised_entropy(p * 7) == pytest.approx(-(p * np.log(p)).sum() / np.log(3))


def toy_nodes(layers: int = 6, per_layer: int = 3) -> pl.DataFrame:
    count = layers * per_layer
    return pl.DataFrame(
        {
            "node": np.arange(count),
            "layer": [f"l{i // per_layer}" for i in range(count)],
            "layer_index": np.arange(count) // per_layer,
            "kind": ["conv"] * count,
            "channel": np.arange(count) % per_layer,
        }
    )


def test_depth_buckets_are_quartiles_of_the_layer_order():
    assert depth_buckets(np.arange(8)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert depth_buckets(np.array([0, 1, 2, 3])).tolist() == [0, 1, 2, 3]
    assert set(depth_buckets(np.arange(51)).tolist()) == {0, 1, 2, 3}


def test_summary_keys_are_the_documented_ones_and_values_match_numpy():
    nodes = toy_nodes()
    rng = np.random.default_rng(0)
    values = {name: rng.random(nodes.height) for name in CENTRALITIES}
    metrics = summary_metrics(node_table(nodes, values), edges=40)
    expected_keys = {"tg.graph/vertices", "tg.graph/edges"}
    for name in CENTRALITIES:
        expected_keys |= {f"tg.{name}/{stat}" for stat in GLOBAL_STATS}
        expected_keys |= {f"tg.{name}/depth{b}.{s}" for b in range(4) for s in ("mean", "gini")}
    assert set(metrics) == expected_keys and len(metrics) == 121
    strength = values["strength"]
    assert metrics["tg.strength/mean"] == pytest.approx(strength.mean())
    assert metrics["tg.strength/std"] == pytest.approx(strength.std())
    assert metrics["tg.strength/q90"] == pytest.approx(np.quantile(strength, 0.9))
    assert metrics["tg.strength/max"] == pytest.approx(strength.max())
    # layers 0..5 → depth buckets 0,0,1,2,2,3 (layer * 4 // 6): bucket 0 = the first 6 vertices
    assert metrics["tg.strength/depth0.mean"] == pytest.approx(strength[:6].mean())
    assert metrics["tg.strength/depth3.gini"] == pytest.approx(gini(strength[15:]))
    assert metrics["tg.graph/vertices"] == 18 and metrics["tg.graph/edges"] == 40


def test_layer_table_aggregates_each_layer():
    nodes = node_table(toy_nodes(), {"pagerank": np.arange(18, dtype=float)})
    layers = layer_table(nodes)
    assert layers["layer"].to_list() == [f"l{i}" for i in range(6)]
    assert layers["vertices"].to_list() == [3] * 6
    assert layers["pagerank_sum"].to_list() == [3.0 * (3 * i + 1) for i in range(6)]
    assert layers["pagerank_max"].to_list() == [3.0 * i + 2 for i in range(6)]
    assert layers["pagerank_std"].to_list() == pytest.approx([np.std([0, 1, 2])] * 6)
