"""The weighted adjacency of a rolled graph as fast dense per-layer block products."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator
from threadpoolctl import ThreadpoolController

from mlflow_tg.graph.trace import EdgeBlock

# Below this many edges a product takes well under a millisecond: threads would cost more.
THREADED_FROM_EDGES = 1 << 20
_BLAS = ThreadpoolController()


@dataclass(frozen=True)
class Adjacency:
    """Weighted adjacency of a rolled graph: ``undirected`` W and its data-flow half ``flow``.

    ``flow[i, j] = w(j → i)`` and ``W = flow + flowᵀ``. Each is anything with ``@`` (a sparse
    matrix, a LinearOperator), so a caller that knows the graph's structure can pass fast
    products instead of matrices exported from graph-tool. ``tolerance`` is the relative
    residual the solvers stop at: what the products' precision can resolve.
    """

    undirected: Any
    flow: Any
    tolerance: float = 1e-10

    @classmethod
    def from_flow(cls, flow: LinearOperator, tolerance: float = 1e-10) -> Adjacency:
        """W from the data-flow operator, as ``x ↦ flow x + flowᵀ x``."""

        def both_ways(x: np.ndarray) -> np.ndarray:  # W is symmetric: its own transpose
            return flow.matvec(x) + flow.rmatvec(x)

        undirected = LinearOperator(flow.shape, both_ways, rmatvec=both_ways, dtype=np.float64)
        return cls(undirected, flow, tolerance)


def scatter_add(target: np.ndarray, index: np.ndarray, values: np.ndarray, repeats: bool) -> None:
    """``target[index] += values``, also when ``index`` repeats a vertex."""
    if repeats:
        np.add.at(target, index, values)
    else:
        target[index] += values


def as_weights(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``x`` flattened, in the weights' precision: a float64 vector would upcast (copy) them."""
    return np.ravel(x).astype(weights.dtype, copy=False)


def weight_blocks(blocks: list[EdgeBlock], weights: np.ndarray) -> list[tuple]:
    """(inputs, outputs, (groups, out/groups, in/groups) view of the weights, repeats) per block."""
    parts, start = [], 0
    for block in blocks:
        matrix = weights[start : start + block.edges].reshape(block.groups, -1, block.per_group)
        parts.append((block.inputs, block.outputs, matrix, block.repeated_inputs))
        start += block.edges
    return parts


def push(y: np.ndarray, x: np.ndarray, part: tuple) -> None:
    """``y[outputs] += block @ x[inputs]``: what one block sends downstream."""
    inputs, outputs, matrix, _ = part
    if matrix.shape[1:] == (1, 1):  # one edge per output (joins, depthwise convs): element-wise
        y[outputs] += matrix.ravel() * x[inputs]
    else:
        y[outputs] += (matrix @ x[inputs].reshape(matrix.shape[0], -1, 1)).ravel()


def pull(y: np.ndarray, x: np.ndarray, part: tuple) -> None:
    """``y[inputs] += blockᵀ @ x[outputs]``: what one block sends upstream."""
    inputs, outputs, matrix, repeats = part
    if matrix.shape[1:] == (1, 1):
        pulled = matrix.ravel() * x[outputs]
    else:
        pulled = (matrix.transpose(0, 2, 1) @ x[outputs].reshape(matrix.shape[0], -1, 1)).ravel()
    scatter_add(y, inputs, pulled, repeats)


def flow_operator(blocks: list[EdgeBlock], weights: np.ndarray, n: int) -> LinearOperator:
    """The data-flow adjacency A (A[i, j] = w(j → i)) as a product over the dense layer blocks.

    Each block's weights are an (out, in/groups) matrix, so ``A @ x`` is one small dense
    matrix-vector product (BLAS) per layer, several times faster than a sparse product over
    the same edges and with nothing to build: the blocks are views of ``weights``.
    """
    parts = weight_blocks(blocks, weights)

    def downstream(x: np.ndarray) -> np.ndarray:  # y[i] = Σ_j w(j → i) x[j]
        x, y = as_weights(x, weights), np.zeros(n)
        for part in parts:
            push(y, x, part)
        return y

    def upstream(x: np.ndarray) -> np.ndarray:  # y[j] = Σ_i w(j → i) x[i]
        x, y = as_weights(x, weights), np.zeros(n)
        for part in parts:
            pull(y, x, part)
        return y

    return LinearOperator((n, n), matvec=downstream, rmatvec=upstream, dtype=np.float64)


@cache
def thread_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, kept for the process: captures come every epoch."""
    return ThreadPoolExecutor(threads, thread_name_prefix="mlflow_tg-products")


def balanced_shares(parts: list[tuple], threads: int) -> list[list[tuple]]:
    """The blocks dealt to ``threads`` shares of near-equal weight count, largest block first."""
    shares: list[list[tuple]] = [[] for _ in range(threads)]
    sizes = [0] * threads
    for part in sorted(parts, key=lambda part: -part[2].size):
        lightest = sizes.index(min(sizes))
        shares[lightest].append(part)
        sizes[lightest] += part[2].size
    return [share for share in shares if share]


def undirected_operator(
    blocks: list[EdgeBlock], weights: np.ndarray, n: int, threads: int = 1
) -> LinearOperator:
    """W = A + Aᵀ, with both products of a block done while its weights are still in cache.

    The products are bound by reading the weights from memory; a block's second read comes
    from the processor's cache (10-15 % faster than ``A x + Aᵀ x`` on ResNet-50's graph). With
    ``threads`` > 1 a large graph's blocks are shared out to that many threads, each with one
    BLAS thread (numpy releases the GIL in BLAS): a third faster on two cores for ViT-B/16,
    while BLAS's own threads gain nothing on matrix-vector products.
    """
    parts = weight_blocks(blocks, weights)
    shares = balanced_shares(parts, threads) if weights.size >= THREADED_FROM_EDGES else [parts]

    def product(x: np.ndarray, share: list[tuple]) -> np.ndarray:
        y = np.zeros(n)
        for part in share:  # both directions of a block while it is in cache
            push(y, x, part)
            pull(y, x, part)
        return y

    def both_ways(x: np.ndarray) -> np.ndarray:
        x = as_weights(x, weights)
        if len(shares) == 1:
            return product(x, shares[0])
        with _BLAS.limit(limits=1, user_api="blas"):  # more threads than cores thrash
            return sum(thread_pool(len(shares)).map(lambda share: product(x, share), shares))

    return LinearOperator((n, n), both_ways, rmatvec=both_ways, dtype=np.float64)
