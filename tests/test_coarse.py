"""The two-level (layer space) solvers against dense numpy and networkx, and their products."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest
import torch
import torchvision
from graph_tool import spectral
from scipy.sparse.linalg import LinearOperator, aslinearoperator, eigsh

from mlflow_tg.graph import coarse
from mlflow_tg.graph.build import RolledGraphBuilder
from mlflow_tg.graph.centrality import compute_centralities
from mlflow_tg.graph.operator import Adjacency
from tests.test_centrality import as_array, dense_adjacency, nx_graph, top_eigenvector


def chain(widths: list[int], seed: int, skip: bool = False):
    """A layered graph (each layer joined to the next; ``skip``: also to the one after).

    Returns the edges as the centrality tests take them and the layer of each vertex.
    """
    rng = np.random.default_rng(seed)
    starts = np.cumsum([0, *widths])
    layers = [np.arange(starts[i], starts[i + 1]) for i in range(len(widths))]
    pairs = list(itertools.pairwise(layers))
    if skip:
        pairs += list(zip(layers, layers[2:], strict=False))
    src = np.concatenate([np.repeat(a, len(b)) for a, b in pairs])
    dst = np.concatenate([np.tile(b, len(a)) for a, b in pairs])
    weight = rng.uniform(0.1, 2.0, len(src))
    index = np.repeat(np.arange(len(widths)), widths)
    return (int(starts[-1]), src, dst, weight), index


def localised():
    """A long chain with one edge 1,000 times heavier deep inside: a Perron vector on 2 vertices."""
    edges, index = chain([5] * 30, seed=1)
    edges[3][len(edges[3]) // 2] = 1000.0
    return edges, index


def with_a_dead_layer():
    """Layer 4 keeps its edges, all at weight 0: its column of the layer space is dropped."""
    edges, index = chain([4, 6, 3, 5, 4, 6, 3], seed=2)
    _, src, dst, weight = edges
    weight[(index[src] == 4) | (index[dst] == 4)] = 0.0
    return edges, index


def two_chains():
    """Two components of different sizes."""
    (n1, s1, d1, w1), i1 = chain([3, 5, 2, 4], seed=3, skip=True)
    (n2, s2, d2, w2), i2 = chain([6] * 12, seed=4)
    edges = (n1 + n2, np.r_[s1, s2 + n1], np.r_[d1, d2 + n1], np.r_[w1, w2])
    return edges, np.r_[i1, i2 + i1.max() + 1]


CASES = {
    "long chain": chain([5] * 80, seed=0),
    "skip": chain([4, 6, 3, 5, 7], seed=5, skip=True),
    "localised": localised(),
    "dead layer": with_a_dead_layer(),
    "two chains": two_chains(),
}


def adjacency_with_layers(case: str) -> Adjacency:
    edges, index = CASES[case]
    flow = dense_adjacency(edges).T  # flow[i, j] = w(j → i)
    undirected = flow + flow.T
    return Adjacency(undirected, flow, 1e-10, coarse.Layers.of_matrix(undirected, index))


@pytest.mark.parametrize("case", CASES)
def test_two_level_eigenvector_matches_dense_eigh(case):
    adjacency = adjacency_with_layers(case)
    strength = adjacency.undirected.sum(axis=1)
    value, vector, converged = coarse.perron(
        adjacency.undirected, adjacency.layers, strength, 1e-10
    )
    expected_value, expected = top_eigenvector(adjacency.undirected)
    assert converged
    assert value == pytest.approx(expected_value, rel=1e-12)
    np.testing.assert_allclose(np.abs(vector), expected, rtol=1e-6, atol=1e-12)
    # and through compute_centralities, as a capture asks for it
    result = compute_centralities(lambda: None, ["eigenvector"], adjacency=adjacency)
    np.testing.assert_allclose(result["eigenvector"], expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_two_level_pagerank_matches_networkx(case):
    edges, _ = CASES[case]
    expected = nx.pagerank(nx_graph(edges), alpha=0.85, weight="weight", tol=1e-13, max_iter=10**4)
    adjacency = adjacency_with_layers(case)
    result = compute_centralities(lambda: None, ["pagerank"], adjacency=adjacency)["pagerank"]
    np.testing.assert_allclose(result, as_array(expected, edges[0]), rtol=1e-4)


def counted(matrix: np.ndarray) -> tuple[object, list[int]]:
    """``matrix`` as an operator that counts its products."""
    calls, operator = [], aslinearoperator(matrix)

    class Counting:
        shape = matrix.shape

        def __matmul__(self, x):
            calls.append(1)
            return operator @ x

    return Counting(), calls


def test_the_layer_space_turns_a_long_chains_cluster_into_a_few_products():
    adjacency = adjacency_with_layers("long chain")
    strength = adjacency.undirected.sum(axis=1)
    values = np.linalg.eigvalsh(adjacency.undirected)
    assert values[-2] / values[-1] > 0.99  # the top of the spectrum is a cluster
    counting, calls = counted(adjacency.undirected)
    *_, converged = coarse.perron(counting, adjacency.layers, strength, 1e-10)
    assert converged
    assert len(calls) <= 12, len(calls)
    lanczos = LinearOperator(adjacency.undirected.shape, matvec=counting.__matmul__)
    calls.clear()
    eigsh(lanczos, k=1, which="LA", v0=np.ones(len(strength)), tol=1e-10)
    assert len(calls) >= 60, len(calls)  # what the same accuracy costs Lanczos


def test_without_convergence_lanczos_finishes_from_the_two_level_vector(monkeypatch):
    monkeypatch.setattr(coarse, "MAX_PRODUCTS", 1)
    adjacency = adjacency_with_layers("localised")
    strength = adjacency.undirected.sum(axis=1)
    *_, converged = coarse.perron(adjacency.undirected, adjacency.layers, strength, 1e-10)
    assert not converged
    result = compute_centralities(lambda: None, ["eigenvector"], adjacency=adjacency)
    _, expected = top_eigenvector(adjacency.undirected)
    np.testing.assert_allclose(result["eigenvector"], expected, rtol=1e-6, atol=1e-12)


class Concatenated(torch.nn.Module):
    """A layer reading two earlier layers at once, and one of them twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(2, 3, 1), torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c = torch.nn.Conv2d(10, 5, 1)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        return self.c(torch.cat([a, b, a], 1))


@pytest.mark.parametrize(
    ("model", "input_shape"),
    [
        (Concatenated(), (2, 4, 4)),
        (torchvision.models.googlenet(num_classes=10, init_weights=True), (3, 32, 32)),
    ],
)
def test_the_block_pass_equals_the_adjacency_times_the_layer_basis(model, input_shape):
    torch.manual_seed(0)
    builder = RolledGraphBuilder(model.eval(), input_shape)
    graph = builder.build(model)
    matrix = spectral.adjacency(graph, weight=graph.ep["weight"])
    index = builder.nodes["layer_index"].to_numpy()
    values = np.random.default_rng(0).random(builder.num_vertices)
    fast = builder.adjacency().layers.spread(values)
    exact = coarse.Layers.of_matrix(matrix, index).spread(values)
    np.testing.assert_allclose(fast.toarray(), exact.toarray(), rtol=1e-12, atol=1e-12)


def test_a_torchvision_network_needs_a_handful_of_products():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    builder = RolledGraphBuilder(model, (3, 32, 32))
    builder.refresh(model)
    adjacency = builder.adjacency()
    strength = adjacency.undirected @ np.ones(builder.num_vertices)
    counting, calls = counted(adjacency.undirected)
    *_, converged = coarse.perron(counting, adjacency.layers, strength, adjacency.tolerance)
    assert converged
    assert len(calls) <= 12, len(calls)
    lanczos = Adjacency(adjacency.undirected, adjacency.flow, adjacency.tolerance)
    expected = compute_centralities(lambda: None, ["eigenvector", "pagerank"], adjacency=lanczos)
    result = compute_centralities(lambda: None, ["eigenvector", "pagerank"], adjacency=adjacency)
    for name in ("eigenvector", "pagerank"):
        np.testing.assert_allclose(
            result[name], expected[name], rtol=0, atol=1e-8 * expected[name].max(), err_msg=name
        )


def test_a_network_without_weight_gets_the_uniform_pagerank():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    builder = RolledGraphBuilder(model, (4,))
    builder.refresh(model)
    result = compute_centralities(
        lambda: None, ["eigenvector", "pagerank"], adjacency=builder.adjacency()
    )
    np.testing.assert_allclose(result["pagerank"], np.full(15, 1 / 15), rtol=1e-12)
    np.testing.assert_array_equal(result["eigenvector"], np.zeros(15))


class WithAnEmptyLayer(torch.nn.Module):
    """A layer of no outputs beside one of three, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 0)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_a_layer_without_outputs_is_refreshed():
    model = WithAnEmptyLayer()
    builder = RolledGraphBuilder(model, (4,))
    builder.refresh(model)
    np.testing.assert_allclose(builder.weights, model.a.weight.detach().abs().numpy().ravel())
