"""Vertex centralities of a rolled graph, computed with graph-tool and scipy.

Path-based centralities (betweenness, closeness) run in graph-tool's C++. Strength and the
spectral ones are linear algebra on the weighted adjacency matrix, exported from graph-tool or
given by the caller as faster block products: Lanczos (``eigsh``) for the eigenvector,
conjugate gradients for PageRank and Katz, which on an undirected graph are symmetric
positive-definite systems. On a layered network graph-tool's own power iterations are wrong
(eigenvector: a bipartite spectrum ±λ_max makes it oscillate) or slow (PageRank: ~70
iterations of 160 ms on ResNet-50's rolled graph, against ~30 sparse products of 40 ms here);
the results are checked against networkx in the tests.

The graph is undirected with a non-negative edge property ``weight``; each edge was added
upstream → downstream, so ``GraphView(graph, directed=True)`` is the data-flow DAG. Parallel
edges count as one edge of their summed weight in strength and the spectral centralities, while
graph-tool's shortest paths take only the strongest of them; ``RolledGraphBuilder`` merges them,
so every centrality of a rolled graph sees the same edges. Every centrality is a float64 array
indexed by vertex. ``W`` is the weighted adjacency matrix, ``λ_max`` its largest eigenvalue
(the spectral radius), ``N`` the number of vertices.

- ``strength``: sum of the weights of the edges at the vertex.
- ``eigenvector``: Perron eigenvector of ``W`` (eigenvalue ``λ_max``), absolute values, L2 norm 1.
- ``pagerank``: PageRank of the undirected weighted graph, damping 0.85, the mass of vertices
  without weight spread uniformly (as networkx does); sums to 1.
- ``katz``: solution of ``x = α W x + 1`` with ``α = KATZ_ALPHA_FRACTION / λ_max``, L2 norm 1;
  uniform when the graph has no weight.
- ``hits_authority``: HITS authority on the directed data-flow graph, i.e. the top singular
  vector of its weighted adjacency on the receiving side, absolute values, sums to 1. On a plain
  layered net all of it lies in the one layer whose incoming weights have the top singular value.
- ``betweenness``: fraction of the shortest paths between pairs of other vertices that pass
  through the vertex, with edge length ``1 / weight`` (zero-weight edges cut). Estimated from
  ``pivots`` sampled source vertices (exact when ``pivots >= N``); the estimate is unbiased, lies
  in [0, 1] and is comparable across graph sizes.
- ``closeness``: harmonic closeness, the mean of ``1 / d(s, v)`` over ``sources`` sampled
  vertices ``s ≠ v``, with ``d`` the shortest-path length (edge length ``1 / weight``) and
  ``1 / ∞ = 0``. With every vertex as a source it is networkx's harmonic centrality / (N - 1).

Pivots and sources are the first ``pivots`` (``sources``) vertices of one permutation drawn
from ``numpy.random.default_rng(seed)`` (see :func:`sample_vertices`): deterministic given
``seed`` and independent of any global random state.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import graph_tool as gt
import numpy as np
from graph_tool import centrality, spectral, topology
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, cg, eigsh, svds

from mlflow_tg.graph import coarse
from mlflow_tg.graph.operator import Adjacency

CENTRALITIES: tuple[str, ...] = (
    "strength",
    "eigenvector",
    "pagerank",
    "katz",
    "hits_authority",
    "betweenness",
    "closeness",
)
# Katz's α as a fraction of 1 / λ_max: the series Σ (αW)^k converges only for α < 1 / λ_max.
KATZ_ALPHA_FRACTION = 0.5
PAGERANK_DAMPING = 0.85
# ARPACK (eigsh, svds) needs k < N; below this size a dense decomposition is exact and instant.
_DENSE_MAX_VERTICES = 2


class ConvergenceError(ArithmeticError):
    """A centrality's solver failed: ARPACK did not converge, or CG's residual became NaN/inf."""


def set_threads(n: int) -> None:
    """Set graph-tool's OpenMP threads (``graph_tool.openmp_set_num_threads``).

    Args:
        n: Number of threads; ``n <= 0`` leaves graph-tool's default.
    """
    if n > 0:
        gt.openmp_set_num_threads(n)


def sample_vertices(num_vertices: int, count: int, seed: int) -> np.ndarray:
    """The vertices used as betweenness pivots or closeness sources, sorted.

    The first ``count`` vertices of one seeded permutation, so smaller samples are subsets of
    larger ones and the same seed gives the same vertices for pivots and sources.

    Args:
        num_vertices: Number of vertices N of the graph.
        count: Sample size; ``count >= N`` returns every vertex.
        seed: Seed of ``numpy.random.default_rng``; the global random state is not touched.
    """
    order = np.random.default_rng(seed).permutation(num_vertices)
    return np.sort(order[:count])


def compute_centralities(
    graph: gt.Graph | Callable[[], gt.Graph],
    names: Sequence[str],
    *,
    pivots: int = 64,
    sources: int = 64,
    seed: int = 0,
    adjacency: Adjacency | None = None,
) -> dict[str, np.ndarray]:
    """Compute the named centralities of ``graph`` (definitions in the module docstring).

    Args:
        graph: Undirected graph-tool graph with a non-negative edge property ``weight``, or a
            function returning it, called only when a centrality needs the graph itself
            (betweenness, closeness, or any of them when ``adjacency`` is None).
        names: Centralities to compute, each one of ``CENTRALITIES``.
        pivots: Number of sampled source vertices for betweenness.
        sources: Number of sampled source vertices for closeness.
        seed: Seed of the vertex sampling.
        adjacency: The weighted adjacency of ``graph`` as fast products when the caller has
            them (``RolledGraphBuilder.adjacency``); exported from graph-tool when None.

    Returns:
        Each named centrality as a float64 array of length ``graph.num_vertices()``.

    Raises:
        ValueError: On an unknown name or a sample size below 1.
        ConvergenceError: When a spectral centrality's solver fails on this graph.
    """
    unknown = [name for name in names if name not in CENTRALITIES]
    if unknown:
        raise ValueError(f"unknown centrality {unknown}; choose from {list(CENTRALITIES)}")
    if pivots < 1 or sources < 1:
        raise ValueError(f"pivots and sources must be >= 1, got {pivots} and {sources}")
    context = _Context(graph, pivots=pivots, sources=sources, seed=seed, adjacency=adjacency)
    results = {}
    for name in names:
        try:
            results[name] = _COMPUTE[name](context)
        except ArpackNoConvergence as error:
            raise ConvergenceError(f"{name} did not converge: {error}") from error
    return results


class _Context:
    """One graph and what several centralities share, each part computed at most once."""

    def __init__(
        self, graph: gt.Graph | Callable[[], gt.Graph], *, pivots: int, sources: int, seed: int,
        adjacency=None,
    ) -> None:  # fmt: skip
        self.source, self.pivots, self.sources, self.seed = graph, pivots, sources, seed
        self.given = adjacency
        self.layers = None if adjacency is None else adjacency.layers
        self.tolerance = 1e-10 if adjacency is None else adjacency.tolerance
        self.n = self.graph.num_vertices() if adjacency is None else adjacency.undirected.shape[0]

    @cached_property
    def graph(self) -> gt.Graph:
        """The graph-tool graph, built now if the caller gave a function."""
        return self.source if isinstance(self.source, gt.Graph) else self.source()

    @cached_property
    def weight(self) -> gt.EdgePropertyMap:
        """The edge weights of the graph-tool graph."""
        return self.graph.ep["weight"]

    @cached_property
    def undirected(self) -> Any:
        """W, shared by the spectral centralities."""
        if self.given is not None:
            return self.given.undirected
        return spectral.adjacency(self.graph, weight=self.weight).astype(np.float64)

    @cached_property
    def flow(self) -> Any:
        """The data-flow adjacency A[i, j] = w(j → i) (graph-tool's convention)."""
        if self.given is not None:
            return self.given.flow
        directed = gt.GraphView(self.graph, directed=True)
        return spectral.adjacency(directed, weight=self.weight).astype(np.float64)

    @cached_property
    def strength(self) -> np.ndarray:
        """``W 1``, the weight at each vertex, shared by strength, PageRank and the eigenvector."""
        return np.asarray(self.undirected @ np.ones(self.n), dtype=np.float64)

    @cached_property
    def perron(self) -> tuple[float, np.ndarray]:
        """λ_max and the Perron eigenvector of W, shared by eigenvector and katz."""
        return _perron(self.undirected, self.strength, self.tolerance, self.layers)

    @cached_property
    def positive(self) -> gt.Graph:
        """The graph without its zero-weight edges: a zero weight is no connection at all."""
        weights = self.weight.a
        with np.errstate(divide="ignore"):
            keep = (weights > 0) & np.isfinite(1.0 / weights)
        return self.graph if keep.all() else gt.GraphView(self.graph, efilt=keep)

    @cached_property
    def length(self) -> gt.EdgePropertyMap:
        """Edge lengths ``1 / weight`` (strong connection, short path) on ``positive``."""
        with np.errstate(divide="ignore"):
            return self.graph.new_edge_property("double", vals=1.0 / self.weight.a)


def _perron(
    adjacency, strength: np.ndarray, tolerance: float, layers: coarse.Layers | None = None
) -> tuple[float, np.ndarray]:
    """Largest eigenvalue and its eigenvector (absolute, L2 norm 1) of a symmetric matrix ≥ 0.

    ``strength`` is ``adjacency @ 1``; when it is all zero so is the matrix, without a Perron
    vector. ``tolerance`` is ARPACK's relative accuracy of the eigenpair. With ``layers`` the
    two-level solver runs first (3 products instead of 60-140 on ViTs); Lanczos
    finishes from its vector should it not converge.
    """
    n = adjacency.shape[0]
    if not strength.any():
        return 0.0, np.zeros(n)
    if n <= _DENSE_MAX_VERTICES:
        values, vectors = np.linalg.eigh(adjacency @ np.eye(n))
        return _unit_perron(values[-1], vectors[:, -1])
    start = np.ones(n)
    if layers is not None:
        value, vector, converged = coarse.perron(adjacency, layers, strength, tolerance)
        if converged:
            return _unit_perron(value, vector)
        start = np.abs(vector)
    # which="LA" (largest algebraic), not "LM": on a bipartite graph -λ_max has the same
    # magnitude. A positive start vector overlaps the non-negative Perron vector and keeps
    # ARPACK deterministic.
    # tol 1e-10 instead of machine precision: a third faster, vector off by ~1e-12.
    values, vectors = eigsh(adjacency, k=1, which="LA", v0=start, tol=tolerance)
    return _unit_perron(values[0], vectors[:, 0])


def _unit_perron(value: float, vector: np.ndarray) -> tuple[float, np.ndarray]:
    """The eigenpair as returned: absolute values (the Perron vector's sign), L2 norm 1."""
    vector = np.abs(vector)
    return float(value), vector / np.linalg.norm(vector)


def rayleigh_quotient(adjacency: Any, vector: np.ndarray) -> float:
    """``xᵀ W x / xᵀ x``: λ_max for the Perron eigenvector, 0 for a zero vector."""
    norm = float(vector @ vector)
    return float(vector @ (adjacency @ vector)) / norm if norm > 0 else 0.0


def _strength(context: _Context) -> np.ndarray:
    return context.strength.copy()


def _eigenvector(context: _Context) -> np.ndarray:
    # Not graph-tool's eigenvector(): it is a power iteration, and a plain layered network is
    # bipartite, so its spectrum is symmetric (±λ_max) and the iteration oscillates forever
    # (or stops at max_iter with a wrong vector). Lanczos (eigsh) separates +λ_max from -λ_max.
    return context.perron[1].copy()


# scipy 1.12 renamed cg's relative tolerance tol → rtol (1.14 removed tol); 1.10 and 1.11 only
# know tol.
_CG_RTOL = "rtol" if "rtol" in inspect.signature(cg).parameters else "tol"


def conjugate_gradient(
    matvec: Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    rtol: float = 1e-10,
    preconditioner: LinearOperator | None = None,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Solve ``M x = b`` for a symmetric positive-definite M given as ``matvec`` (scipy's cg).

    ``preconditioner`` (symmetric positive definite, approximating M⁻¹) and ``start`` go to cg
    as ``M`` and ``x0``.

    scipy's cg spends one product more than the hand-written CG it replaced (the residual of
    its start vector), measured on a rolled torchvision ResNet-18 (4,907 vertices, 1.9 M
    edges): PageRank 20.8 ms against 18.7, Katz 13.1 against 11.4 (ResNet-50: 610 against
    623 ms, 250 against 191), under 1 % of a capture; same solutions to 1e-15.

    Raises:
        ConvergenceError: At the first NaN or infinite product or right-hand side (an overflow
            in M or b), which no further iteration can repair; or when the relative residual
            is still above ``rtol`` after ``10 len(b) + 100`` iterations.
    """
    overflow = "conjugate gradients: the residual is NaN or infinite"

    def checked(v: np.ndarray) -> np.ndarray:
        product = matvec(np.ravel(v))
        if not np.isfinite(product).all():
            raise ConvergenceError(overflow)
        return product

    if not np.isfinite(b).all():
        raise ConvergenceError(overflow)
    n = len(b)
    operator = LinearOperator((n, n), matvec=checked, dtype=np.float64)
    x, info = cg(
        operator, b, x0=start, M=preconditioner, maxiter=10 * n + 100, atol=0.0, **{_CG_RTOL: rtol}
    )
    if info != 0:
        raise ConvergenceError(f"conjugate gradients did not converge (scipy cg info {info})")
    return x


def _pagerank(context: _Context) -> np.ndarray:
    # x = d W D⁻¹ x + c·1 (D: strengths; c the teleport plus the spread mass of vertices without
    # weight). With x = c D^½ y on the weighted vertices, (I - d D^-½ W D^-½) y = D^-½ 1: a
    # symmetric system with eigenvalues in [1 - d, 1 + d], solved by CG in ~30 products.
    adjacency, damping, strength = context.undirected, PAGERANK_DAMPING, context.strength
    weighted = strength > 0
    inv_sqrt = np.zeros(context.n)
    inv_sqrt[weighted] = 1 / np.sqrt(strength[weighted])
    preconditioner, start = None, None
    if context.layers is not None and context.n > _DENSE_MAX_VERTICES and weighted.any():
        # the layer space as a coarse correction: 6 products instead of 19 on ViTs
        preconditioner, correction = coarse.pagerank_preconditioner(
            context.layers, inv_sqrt, damping
        )
        start = correction(inv_sqrt)
    y = conjugate_gradient(
        lambda v: v - damping * inv_sqrt * (adjacency @ (inv_sqrt * v)),
        inv_sqrt,
        context.tolerance,
        preconditioner,
        start,
    )
    rank = np.ones(context.n)  # a vertex without weight only gets c
    rank[weighted] = np.sqrt(strength[weighted]) * y[weighted]
    return rank / rank.sum()


def _katz(context: _Context) -> np.ndarray:
    spectral_radius = context.perron[0]
    if spectral_radius <= 0:
        return np.full(context.n, 1.0 / np.sqrt(max(context.n, 1)))
    # graph-tool's fixed default α = 0.01 makes the series diverge once λ_max > 100, which large
    # weights reach; α as a fraction of 1 / λ_max always converges and keeps the attenuation
    # comparable between graphs. (I - αW) x = 1 is then symmetric positive definite (eigenvalues
    # in [1 - f, 1 + f], f = KATZ_ALPHA_FRACTION): CG needs ~20 products.
    alpha, adjacency = KATZ_ALPHA_FRACTION / spectral_radius, context.undirected
    katz = conjugate_gradient(
        lambda v: v - alpha * (adjacency @ v), np.ones(context.n), context.tolerance
    )
    return katz / np.linalg.norm(katz)


def _hits_authority(context: _Context) -> np.ndarray:
    # The directed data-flow view: on the undirected graph W Wᵀ = W², so authorities would just
    # be the eigenvector centrality again. graph-tool's adjacency has A[i, j] = w(j → i), so the
    # authorities x = A y are the left singular vector of A. Not graph-tool's hits(): its power
    # iteration on A Aᵀ crawls when layers have near-equal top singular values (52 s to converge
    # on a ResNet-18-sized graph; at max_iter=1000 still 30 % off) while svds takes 0.1 s.
    flow = context.flow
    if not (flow @ np.ones(context.n)).any():
        return np.zeros(context.n)
    if context.n <= _DENSE_MAX_VERTICES:
        left = np.linalg.svd(flow @ np.eye(context.n))[0][:, 0]
    else:
        left = svds(flow, k=1, v0=np.ones(context.n), tol=context.tolerance)[0][:, 0]
    authority = np.abs(left)
    return authority / authority.sum()


def _betweenness(context: _Context) -> np.ndarray:
    pivots = None
    if context.pivots < context.n:
        pivots = sample_vertices(context.n, context.pivots, context.seed)
    # With pivots, graph-tool divides a pivot's sum by (p-1)(N-2)/2 and any other vertex's by
    # p(N-2)/2 (the source pairs it can lie between), an unbiased estimate of the exact
    # normalised betweenness (checked in the tests), so no rescaling by N / p is needed.
    between, _ = centrality.betweenness(
        context.positive, pivots=pivots, weight=context.length, norm=True
    )
    return np.array(between.a, dtype=np.float64)


def _closeness(context: _Context) -> np.ndarray:
    view, length = context.positive, context.length
    sources = sample_vertices(context.n, context.sources, context.seed)
    total = np.zeros(context.n)
    for source in sources:
        # One Dijkstra per sampled source: graph-tool's closeness() always runs from all N.
        distance = topology.shortest_distance(view, source=view.vertex(source), weights=length)
        with np.errstate(divide="ignore"):
            inverse = 1.0 / distance.a  # unreachable: distance inf, inverse 0
        inverse[source] = 0.0
        total += inverse
    # Each vertex averages over the sampled sources other than itself.
    others = len(sources) - np.isin(np.arange(context.n), sources)
    return np.divide(total, others, out=np.zeros(context.n), where=others > 0)


_COMPUTE: dict[str, Callable[[_Context], np.ndarray]] = {
    "strength": _strength,
    "eigenvector": _eigenvector,
    "pagerank": _pagerank,
    "katz": _katz,
    "hits_authority": _hits_authority,
    "betweenness": _betweenness,
    "closeness": _closeness,
}
