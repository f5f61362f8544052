"""Centralities against independent references (networkx, dense numpy) on small graphs."""

from __future__ import annotations

import itertools

import graph_tool as gt
import networkx as nx
import numpy as np
import pytest
from graph_tool import centrality as gt_centrality
from graph_tool import topology
from scipy.sparse.linalg import ArpackNoConvergence

from mlflow_tg.graph import centrality
from mlflow_tg.graph.centrality import (
    CENTRALITIES,
    KATZ_ALPHA_FRACTION,
    ConvergenceError,
    compute_centralities,
    conjugate_gradient,
    sample_vertices,
)

Edges = tuple[int, np.ndarray, np.ndarray, np.ndarray]  # N, source, target, weight


def layered(sizes: list[int], seed: int, skip: bool = False) -> Edges:
    """All edges between adjacent layers (bipartite); ``skip`` adds every layer 0 → 2 edge."""
    offsets = np.cumsum([0, *sizes])
    layers = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(sizes))]
    pairs = list(itertools.pairwise(layers))
    if skip:
        pairs.append((layers[0], layers[2]))
    src = np.concatenate([np.repeat(a, len(b)) for a, b in pairs])
    dst = np.concatenate([np.tile(b, len(a)) for a, b in pairs])
    weight = np.random.default_rng(seed).uniform(0.1, 2.0, len(src))
    return int(offsets[-1]), src, dst, weight


def disconnected() -> Edges:
    """Two layered components of different sizes and one isolated vertex."""
    n1, src1, dst1, w1 = layered([3, 5, 2], seed=1, skip=True)
    n2, src2, dst2, w2 = layered([2, 4], seed=2)
    src = np.concatenate([src1, src2 + n1])
    dst = np.concatenate([dst1, dst2 + n1])
    return n1 + n2 + 1, src, dst, np.concatenate([w1, w2])


def with_zero_weights() -> Edges:
    n, src, dst, weight = layered([4, 6, 3], seed=3, skip=True)
    weight[::5] = 0.0
    weight[np.flatnonzero(src == 1)] = 0.0  # vertex 1 keeps its edges, all at weight 0
    return n, src, dst, weight


CASES = {
    "bipartite": layered([4, 6, 3], seed=0),
    "skip": layered([4, 6, 3], seed=0, skip=True),
    "disconnected": disconnected(),
    "zero_weights": with_zero_weights(),
}


def build(edges: Edges) -> gt.Graph:
    """The graph-tool graph as the project builds it."""
    n, src, dst, weight = edges
    g = gt.Graph(directed=False)
    g.add_vertex(n)
    w = g.new_edge_property("double")
    g.add_edge_list(np.column_stack([src, dst, weight]), eprops=[w])
    g.ep["weight"] = w
    return g


def nx_graph(edges: Edges, directed: bool = False, lengths: bool = False) -> nx.Graph:
    """The networkx graph; with ``lengths``, zero-weight edges dropped and ``dist = 1 / weight``."""
    n, src, dst, weight = edges
    graph = nx.DiGraph() if directed else nx.Graph()
    graph.add_nodes_from(range(n))
    for s, d, w in zip(src.tolist(), dst.tolist(), weight.tolist(), strict=True):
        if not lengths:
            graph.add_edge(s, d, weight=w)
        elif w > 0:
            graph.add_edge(s, d, dist=1.0 / w)
    return graph


def dense_adjacency(edges: Edges) -> np.ndarray:
    """Directed weighted adjacency M[source, target], written without graph-tool."""
    n, src, dst, weight = edges
    matrix = np.zeros((n, n))
    np.add.at(matrix, (src, dst), weight)
    return matrix


def top_eigenvector(symmetric: np.ndarray) -> tuple[float, np.ndarray]:
    values, vectors = np.linalg.eigh(symmetric)
    return values[-1], np.abs(vectors[:, -1])


def as_array(values: dict[int, float], n: int) -> np.ndarray:
    return np.array([values[v] for v in range(n)])


def compute(edges: Edges, name: str, **kwargs) -> np.ndarray:
    result = compute_centralities(build(edges), [name], **kwargs)[name]
    assert result.dtype == np.float64
    assert result.shape == (edges[0],)
    return result


@pytest.mark.parametrize("case", CASES)
def test_strength(case):
    edges = CASES[case]
    expected = as_array(dict(nx_graph(edges).degree(weight="weight")), edges[0])
    np.testing.assert_allclose(compute(edges, "strength"), expected, rtol=1e-12)


def test_layered_graph_is_bipartite_and_the_skip_graph_is_not():
    assert topology.is_bipartite(build(CASES["bipartite"]))
    assert not topology.is_bipartite(build(CASES["skip"]))


@pytest.mark.parametrize("case", CASES)
def test_eigenvector_matches_dense_eigh(case):
    edges = CASES[case]
    matrix = dense_adjacency(edges)
    _, expected = top_eigenvector(matrix + matrix.T)
    result = compute(edges, "eigenvector")
    np.testing.assert_allclose(result, expected / np.linalg.norm(expected), rtol=1e-6, atol=1e-12)


def test_eigenvector_of_bipartite_graph_matches_networkx():
    edges = CASES["bipartite"]
    expected = as_array(nx.eigenvector_centrality_numpy(nx_graph(edges), weight="weight"), 13)
    np.testing.assert_allclose(compute(edges, "eigenvector"), expected, rtol=1e-6)


def test_eigenvector_and_katz_share_one_eigsh_call(monkeypatch):
    calls = []

    def counting_eigsh(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    original = centrality.eigsh
    monkeypatch.setattr(centrality, "eigsh", counting_eigsh)
    compute_centralities(build(CASES["skip"]), ["eigenvector", "katz"])
    assert len(calls) == 1


@pytest.mark.parametrize("case", CASES)
def test_pagerank_matches_networkx(case):
    edges = CASES[case]
    expected = nx.pagerank(nx_graph(edges), alpha=0.85, weight="weight", tol=1e-13, max_iter=10**4)
    result = compute(edges, "pagerank")
    np.testing.assert_allclose(result, as_array(expected, edges[0]), rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_katz_matches_networkx(case):
    edges = CASES[case]
    matrix = dense_adjacency(edges)
    spectral_radius, _ = top_eigenvector(matrix + matrix.T)
    alpha = KATZ_ALPHA_FRACTION / spectral_radius
    graph = nx_graph(edges)
    expected = nx.katz_centrality_numpy(graph, alpha=alpha, beta=1.0, weight="weight")
    np.testing.assert_allclose(compute(edges, "katz"), as_array(expected, edges[0]), rtol=1e-4)


def test_katz_converges_and_is_unchanged_when_weights_are_huge():
    # A fixed α = 0.01 diverges once λ_max > 100; α ∝ 1 / λ_max makes Katz scale-free.
    n, src, dst, weight = CASES["skip"]
    huge = compute((n, src, dst, weight * 1e4), "katz")
    np.testing.assert_allclose(huge, compute(CASES["skip"], "katz"), rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_hits_authority_matches_networkx_and_dense_eigh(case):
    edges = CASES[case]
    _, authorities = nx.hits(nx_graph(edges, directed=True), max_iter=10**4, tol=1e-12)
    matrix = dense_adjacency(edges)
    _, dense = top_eigenvector(matrix.T @ matrix)  # authorities: eigenvector of MᵀM
    result = compute(edges, "hits_authority")
    np.testing.assert_allclose(result.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(result, dense / dense.sum(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(result, as_array(authorities, edges[0]), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_betweenness_with_all_pivots_matches_networkx(case):
    edges = CASES[case]
    graph = nx_graph(edges, lengths=True)
    expected = nx.betweenness_centrality(graph, weight="dist", normalized=True)
    result = compute(edges, "betweenness", pivots=edges[0])
    np.testing.assert_allclose(result, as_array(expected, edges[0]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("case", "seed"), [("skip", 0), ("skip", 1), ("zero_weights", 2)])
def test_sampled_betweenness_is_the_subset_betweenness_rescaled(case, seed):
    edges = CASES[case]
    n, pivots = edges[0], 5
    sample = sample_vertices(n, pivots, seed)
    graph = nx_graph(edges, lengths=True)
    subset = nx.betweenness_centrality_subset(
        graph, sources=sample, targets=range(n), weight="dist"
    )
    # Pivots have p - 1 other sampled sources, the rest p; each source pairs with N - 2 targets.
    is_pivot = np.isin(np.arange(n), sample)
    expected = as_array(subset, n) / ((pivots - is_pivot) * (n - 2) / 2)
    result = compute(edges, "betweenness", pivots=pivots, seed=seed)
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12)


def test_sampled_betweenness_is_unbiased():
    # Averaged over every possible pivot set, the estimate is the exact normalised betweenness.
    n, src, dst, weight = layered([2, 3, 2], seed=4, skip=True)
    g = build((n, src, dst, weight))
    length = g.new_edge_property("double", vals=1.0 / g.ep["weight"].a)
    subsets = list(itertools.combinations(range(n), 3))
    estimates = [
        gt_centrality.betweenness(g, pivots=list(s), weight=length, norm=True)[0].a for s in subsets
    ]
    exact = compute((n, src, dst, weight), "betweenness", pivots=n)
    assert exact.max() > 0
    np.testing.assert_allclose(np.mean(estimates, axis=0), exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_closeness_with_all_sources_is_harmonic_centrality(case):
    edges = CASES[case]
    n = edges[0]
    expected = nx.harmonic_centrality(nx_graph(edges, lengths=True), distance="dist")
    result = compute(edges, "closeness", sources=n)
    np.testing.assert_allclose(result, as_array(expected, n) / (n - 1), rtol=1e-9)


@pytest.mark.parametrize(("case", "seed"), [("skip", 0), ("disconnected", 1), ("zero_weights", 2)])
def test_sampled_closeness_matches_dijkstra(case, seed):
    edges = CASES[case]
    n, count = edges[0], 4
    graph = nx_graph(edges, lengths=True)
    total, others = np.zeros(n), np.zeros(n)
    for source in sample_vertices(n, count, seed).tolist():
        for target, distance in nx.single_source_dijkstra_path_length(
            graph, source, weight="dist"
        ).items():
            if target != source:
                total[target] += 1.0 / distance
        others += np.arange(n) != source
    result = compute(edges, "closeness", sources=count, seed=seed)
    np.testing.assert_allclose(result, total / others, rtol=1e-9)


def test_sampling_is_deterministic_and_leaves_the_global_rng_alone():
    edges = CASES["skip"]
    state = np.random.get_state()
    first = compute_centralities(build(edges), ["betweenness", "closeness"], pivots=4, sources=4)
    second = compute_centralities(build(edges), ["betweenness", "closeness"], pivots=4, sources=4)
    other = compute_centralities(
        build(edges), ["betweenness", "closeness"], pivots=4, sources=4, seed=1
    )
    for name in ("betweenness", "closeness"):
        np.testing.assert_array_equal(first[name], second[name])
        assert not np.allclose(first[name], other[name])
    assert not np.array_equal(sample_vertices(13, 4, 0), sample_vertices(13, 4, 1))
    np.testing.assert_array_equal(np.random.get_state()[1], state[1])


def test_sample_vertices():
    sample = sample_vertices(100, 10, seed=7)
    assert len(np.unique(sample)) == 10
    assert set(sample_vertices(100, 5, seed=7)) <= set(sample)
    np.testing.assert_array_equal(sample_vertices(5, 64, seed=7), np.arange(5))


def test_unknown_name_is_rejected_with_the_allowed_names():
    with pytest.raises(ValueError, match="degree_centrality") as error:
        compute_centralities(build(CASES["skip"]), ["strength", "degree_centrality"])
    for name in CENTRALITIES:
        assert name in str(error.value)


@pytest.mark.parametrize(
    "edges",
    [
        (1, np.array([], int), np.array([], int), np.array([])),
        (5, np.array([], int), np.array([], int), np.array([])),
        (6, np.array([0, 1, 3]), np.array([1, 2, 4]), np.zeros(3)),
        (3, np.array([0, 1]), np.array([1, 2]), np.array([1.0, 0.0])),
    ],
    ids=["one_vertex", "no_edges", "all_zero_weights", "zero_weight_tail"],
)
@pytest.mark.parametrize("samples", [1, 64])
def test_degenerate_graphs_give_finite_results(edges, samples):
    n = edges[0]
    result = compute_centralities(build(edges), CENTRALITIES, pivots=samples, sources=samples)
    for name, values in result.items():
        assert values.shape == (n,), name
        assert np.isfinite(values).all(), name
    if edges[3].sum() == 0:  # no weight at all: nothing is central, PageRank and Katz uniform
        for name in ("strength", "eigenvector", "hits_authority", "betweenness", "closeness"):
            np.testing.assert_array_equal(result[name], 0.0)
        np.testing.assert_allclose(result["pagerank"], 1.0 / n)
        np.testing.assert_allclose(result["katz"], 1.0 / np.sqrt(n))


def test_two_vertices_use_the_dense_path():
    edges = (2, np.array([0]), np.array([1]), np.array([2.0]))
    result = compute_centralities(build(edges), CENTRALITIES)
    np.testing.assert_allclose(result["strength"], [2.0, 2.0])
    np.testing.assert_allclose(result["eigenvector"], [2**-0.5, 2**-0.5])
    np.testing.assert_allclose(result["hits_authority"], [0.0, 1.0])  # downstream vertex
    np.testing.assert_allclose(result["closeness"], [2.0, 2.0])  # 1 / (1 / weight)
    np.testing.assert_allclose(result["betweenness"], [0.0, 0.0])


def test_parallel_edges_act_as_one_edge_of_the_summed_weight():
    n, src, dst, weight = CASES["skip"]
    doubled = (n, np.append(src, src[0]), np.append(dst, dst[0]), np.append(weight, 0.5))
    merged = weight.copy()
    merged[0] += 0.5
    spectral = ["strength", "eigenvector", "pagerank", "katz", "hits_authority"]
    left = compute_centralities(build(doubled), spectral)
    right = compute_centralities(build((n, src, dst, merged)), spectral)
    for name in spectral:
        np.testing.assert_allclose(left[name], right[name], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize(("pivots", "sources"), [(0, 64), (64, 0)])
def test_empty_samples_are_rejected(pivots, sources):
    with pytest.raises(ValueError, match="must be >= 1"):
        compute_centralities(build(CASES["skip"]), ["closeness"], pivots=pivots, sources=sources)


def test_conjugate_gradient_stops_at_a_non_finite_residual():
    products = []

    def overflowing(v: np.ndarray) -> np.ndarray:
        products.append(v)
        return v * np.inf

    with pytest.raises(ConvergenceError, match="NaN or infinite"), np.errstate(invalid="ignore"):
        conjugate_gradient(overflowing, np.ones(4))
    assert len(products) == 1  # not the 140 iterations of the cap


def test_arpack_failure_is_a_convergence_error_naming_the_centrality(monkeypatch):
    def failing(*args, **kwargs):
        raise ArpackNoConvergence("ARPACK error -1: No convergence", np.empty(0), np.empty((0, 0)))

    monkeypatch.setattr(centrality, "eigsh", failing)
    with pytest.raises(ConvergenceError, match=r"^eigenvector did not converge: ARPACK error -1"):
        compute_centralities(build(CASES["skip"]), ["strength", "eigenvector"])
