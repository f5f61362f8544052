"""Summary statistics against values worked out by hand, and the documented metric keys."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mlflow_tg.graph.centrality import CENTRALITIES
from mlflow_tg.graph.summaries import (
    GLOBAL_STATS,
    GROWTH_STATS,
    SCALE_FREE_STATS,
    depth_buckets,
    gini,
    growth,
    layer_table,
    node_table,
    normalised_entropy,
    participation,
    profile,
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
    table = node_table(nodes, values)
    metrics = summary_metrics(table, layer_table(table), edges=40, spectral_radius=2.5)
    expected_keys = {"tg.graph/vertices", "tg.graph/edges", "tg.eigenvector/radius"}
    expected_keys |= {f"tg.strength/{stat}" for stat in GROWTH_STATS}
    for name in CENTRALITIES:
        expected_keys |= {f"tg.{name}/{stat}" for stat in GLOBAL_STATS + SCALE_FREE_STATS}
        expected_keys |= {f"tg.{name}/depth{b}.{s}" for b in range(4) for s in ("mean", "gini")}
    assert set(metrics) == expected_keys and len(metrics) == 145
    strength = values["strength"]
    assert metrics["tg.strength/mean"] == pytest.approx(strength.mean())
    assert metrics["tg.strength/std"] == pytest.approx(strength.std())
    assert metrics["tg.strength/q90"] == pytest.approx(np.quantile(strength, 0.9))
    assert metrics["tg.strength/max"] == pytest.approx(strength.max())
    # layers 0..5 → depth buckets 0,0,1,2,2,3 (layer * 4 // 6): bucket 0 = the first 6 vertices
    assert metrics["tg.strength/depth0.mean"] == pytest.approx(strength[:6].mean())
    assert metrics["tg.strength/depth3.gini"] == pytest.approx(gini(strength[15:]))
    assert metrics["tg.graph/vertices"] == 18 and metrics["tg.graph/edges"] == 40
    assert metrics["tg.eigenvector/radius"] == 2.5
    assert metrics["tg.strength/participation"] == pytest.approx(participation(strength))
    assert metrics["tg.strength/growth.mean"] == 0.0  # no first capture given: this is it


def test_participation_is_the_share_of_vertices_the_values_spread_over():
    assert participation(np.full(7, 0.2)) == pytest.approx(1.0)
    assert participation(np.array([0.0, 0.0, 3.0, 0.0])) == pytest.approx(1 / 4)
    assert participation(np.array([1.0, 1.0, 0.0, 0.0])) == pytest.approx(1 / 2)
    # (1 + 4)² / (3 (1 + 16))
    assert participation(np.array([1.0, 2.0, 0.0])) == pytest.approx(25 / 51)
    assert participation(np.zeros(3)) == 0.0


def hand_layers(sums: list[float], means: list[float]) -> pl.DataFrame:
    return pl.DataFrame(
        {"layer_index": range(len(sums)), "pagerank_sum": sums, "strength_mean": means}
    )


def test_profile_shares_out_a_centrality_over_the_layers():
    shares = np.array([0.25, 0.25, 0.5])  # layers at depths 0, 0.5, 1
    found = profile(hand_layers([1.0, 1.0, 2.0], [1.0] * 3), "pagerank")
    assert found["profile.entropy"] == pytest.approx(-(shares * np.log(shares)).sum() / np.log(3))
    assert found["profile.centroid"] == pytest.approx(0.5 * 0.25 + 1.0 * 0.5)
    one_layer = profile(hand_layers([0.0, 0.0, 4.0], [1.0] * 3), "pagerank")
    assert one_layer == {"profile.entropy": 0.0, "profile.centroid": 1.0}


def test_growth_compares_each_layer_with_the_first_capture():
    first = hand_layers([1.0] * 3, [1.0, 2.0, 4.0])
    now = hand_layers([1.0] * 3, [1.0, 2.0, 16.0])  # only the last layer grew, 4x
    found = growth(now, first)
    assert found["growth.mean"] == pytest.approx(np.log(4) / 3)
    # log ratios 0, 0, log 4 at depths 0, 0.5, 1: least-squares slope log 4
    assert found["growth.depthslope"] == pytest.approx(np.log(4))
    assert growth(first, first) == {"growth.mean": 0.0, "growth.depthslope": 0.0}
    # a layer without strength then or now is left out, not a log of zero
    dead = growth(hand_layers([1.0] * 3, [0.0, 2.0, 8.0]), first)
    assert dead["growth.mean"] == pytest.approx(np.log(2) / 2)  # layers 1, 2: log 1, log 2


def test_layer_table_aggregates_each_layer():
    nodes = node_table(toy_nodes(), {"pagerank": np.arange(18, dtype=float)})
    layers = layer_table(nodes)
    assert layers["layer"].to_list() == [f"l{i}" for i in range(6)]
    assert layers["vertices"].to_list() == [3] * 6
    assert layers["pagerank_sum"].to_list() == [3.0 * (3 * i + 1) for i in range(6)]
    assert layers["pagerank_max"].to_list() == [3.0 * i + 2 for i in range(6)]
    assert layers["pagerank_std"].to_list() == pytest.approx([np.std([0, 1, 2])] * 6)
