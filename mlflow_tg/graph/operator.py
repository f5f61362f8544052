"""The weighted adjacency of a rolled graph as fast dense per-layer block products."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator
from threadpoolctl import ThreadpoolController

from mlflow_tg.graph.coarse import Layers
from mlflow_tg.graph.trace import EdgeBlock

# Below this many edges a product takes well under a millisecond: threads would cost more.
THREADED_FROM_EDGES = 1 << 20
# Blocks larger than this are multiplied in pieces of about this size, so that the second
# direction reads a piece from the processor's cache (4 MB: measured best on ViT-H/14's graph,
# between more Python per piece and pieces that no longer fit).
PIECE_BYTES = 1 << 22
_BLAS = ThreadpoolController()


@dataclass(frozen=True)
class Adjacency:
    """Weighted adjacency of a rolled graph: ``undirected`` W and its data-flow half ``flow``.

    ``flow[i, j] = w(j → i)`` and ``W = flow + flowᵀ``. Each is anything with ``@`` (a sparse
    matrix, a LinearOperator), so a caller that knows the graph's structure can pass fast
    products instead of matrices exported from graph-tool. ``tolerance`` is the relative
    residual the solvers stop at: what the products' precision can resolve. ``layers``, when
    known, is the coarse space of the two-level solvers (``coarse``).
    """

    undirected: Any
    flow: Any
    tolerance: float = 1e-10
    layers: Layers | None = None

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


def sent_down(matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``block @ x`` for the values ``x`` of a block's inputs: one value per output."""
    if matrix.shape[1:] == (1, 1):  # one edge per output (joins, depthwise convs): element-wise
        return matrix.ravel() * x
    return (matrix @ x.reshape(matrix.shape[0], -1, 1)).ravel()


def sent_up(matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``blockᵀ @ x`` for the values ``x`` of a block's outputs: one value per input."""
    if matrix.shape[1:] == (1, 1):
        return matrix.ravel() * x
    return (matrix.transpose(0, 2, 1) @ x.reshape(matrix.shape[0], -1, 1)).ravel()


def push(y: np.ndarray, x: np.ndarray, part: tuple) -> None:
    """``y[outputs] += block @ x[inputs]``: what one block sends downstream."""
    inputs, outputs, matrix, _ = part
    y[outputs] += sent_down(matrix, x[inputs])


def pull(y: np.ndarray, x: np.ndarray, part: tuple) -> None:
    """``y[inputs] += blockᵀ @ x[outputs]``: what one block sends upstream."""
    inputs, outputs, matrix, repeats = part
    scatter_add(y, inputs, sent_up(matrix, x[outputs]), repeats)


def down_and_up(matrix: np.ndarray, inward: np.ndarray, outward: np.ndarray) -> tuple:
    """``(block @ inward, blockᵀ @ outward)``, a large block piece by piece while it is cached.

    A piece is whole groups of a grouped block, or rows of a one-group block.
    """
    groups, rows, columns = matrix.shape
    if matrix.nbytes <= PIECE_BYTES or matrix.shape[1:] == (1, 1):
        return sent_down(matrix, inward), sent_up(matrix, outward)
    down, up = np.empty(groups * rows, matrix.dtype), np.zeros(groups * columns, matrix.dtype)
    if groups > 1:
        step = max(1, PIECE_BYTES // (rows * columns * matrix.itemsize))
        for g in range(0, groups, step):
            piece, ins, outs = (
                matrix[g : g + step],
                slice(g * columns, (g + step) * columns),
                slice(g * rows, (g + step) * rows),
            )
            down[outs] = sent_down(piece, inward[ins])
            up[ins] = sent_up(piece, outward[outs])
    else:
        step = max(1, PIECE_BYTES // (columns * matrix.itemsize))
        for r in range(0, rows, step):
            piece = matrix[0, r : r + step]
            down[r : r + step] = piece @ inward
            up += piece.T @ outward[r : r + step]
    return down, up


def push_and_pull(y: np.ndarray, x: np.ndarray, part: tuple) -> None:
    """``push`` and ``pull`` of one block, reading its weights from memory once."""
    inputs, outputs, matrix, repeats = part
    down, up = down_and_up(matrix, x[inputs], x[outputs])
    y[outputs] += down
    scatter_add(y, inputs, up, repeats)


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


def by_layer(values: np.ndarray, layer_of: np.ndarray, layers: np.ndarray):
    """(layer, ``values`` kept on that layer only) for each of ``layers``."""
    if len(layers) == 1:
        return [(layers[0], values)]
    return [(layer, values * (layer_of == layer)) for layer in layers]


def block_layers(blocks: list[EdgeBlock], index: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """The layers each block reads and writes (``index``: layer of each vertex), once per run."""
    return [(np.unique(index[block.inputs]), np.unique(index[block.outputs])) for block in blocks]


def layer_space(
    blocks: list[EdgeBlock],
    weights: np.ndarray,
    index: np.ndarray,
    sides: list[tuple[np.ndarray, ...]],
    threads: int = 1,
) -> Layers:
    """The layers of a rolled graph (``index``: layer of each vertex) with W P in one pass.

    A block reads its inputs and writes its outputs, so W P's column for a layer gets the
    block's push from the layer's inputs and its pull from the layer's outputs: one product of
    each block, as in one product of W, splitting a block's inputs only where they come from
    several layers (a concatenation). ``sides`` is ``block_layers``; ``threads`` share out the
    blocks, as in the products.
    """
    count = int(index.max()) + 1 if len(index) else 0
    parts = [
        (part, *layers) for part, layers in zip(weight_blocks(blocks, weights), sides, strict=True)
    ]
    shares = shared_out(parts, threads, weights.size, size=lambda item: item[0][2].size)

    def share_entries(values: np.ndarray, share: list[tuple]) -> tuple[list, list, list]:
        rows, columns, entries = [], [], []
        for (inputs, outputs, matrix, _), input_layers, output_layers in share:
            if len(input_layers) == len(output_layers) == 1:  # most blocks: one pass
                down, up = down_and_up(matrix, values[inputs], values[outputs])
                sent = [(outputs, input_layers[0], down), (inputs, output_layers[0], up)]
            else:  # a concatenation: each layer's share of the inputs alone
                sent = [
                    (outputs, layer, sent_down(matrix, x))
                    for layer, x in by_layer(values[inputs], index[inputs], input_layers)
                ] + [
                    (inputs, layer, sent_up(matrix, x))
                    for layer, x in by_layer(values[outputs], index[outputs], output_layers)
                ]
            # W P's column of a layer: the block applied to the values on the layer's inputs,
            # and its transpose to the values on the layer's outputs
            for vertices, layer, product in sent:
                rows.append(vertices)
                columns.append(np.full(len(vertices), layer))
                entries.append(product)
        return rows, columns, entries

    def spread(values: np.ndarray) -> sp.csr_matrix:
        values = as_weights(values, weights)
        found = in_threads(lambda share: share_entries(values, share), shares)
        rows, columns, entries = [], [], []
        for share_rows, share_columns, share_values in found:
            rows += share_rows
            columns += share_columns
            entries += share_values
        if not entries:  # a graph without edges
            return sp.csr_matrix((len(index), count))
        entries = np.concatenate(entries).astype(np.float64)
        where = (np.concatenate(rows), np.concatenate(columns))
        return sp.coo_matrix((entries, where), shape=(len(index), count)).tocsr()  # sums repeats

    return Layers(index, count, spread)


@cache
def thread_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, kept for the process: captures come every epoch."""
    return ThreadPoolExecutor(threads, thread_name_prefix="mlflow_tg-products")


def balanced_shares(parts: list, threads: int, size=lambda part: part[2].size) -> list[list]:
    """``parts`` dealt to ``threads`` shares of near-equal total ``size``, largest part first."""
    shares: list[list] = [[] for _ in range(threads)]
    sizes = [0] * threads
    for part in sorted(parts, key=lambda part: -size(part)):
        lightest = sizes.index(min(sizes))
        shares[lightest].append(part)
        sizes[lightest] += size(part)
    return [share for share in shares if share]


def shared_out(parts: list, threads: int, edges: int, size=lambda part: part[2].size) -> list:
    """``parts`` as one share, or dealt to ``threads`` on a graph large enough to gain."""
    if threads > 1 and edges >= THREADED_FROM_EDGES:
        return balanced_shares(parts, threads, size)
    return [parts]


def in_threads(work: Callable[[list], Any], shares: list[list]) -> list:
    """``work`` of each share, the shares in threads of one BLAS thread each.

    numpy and torch release the GIL in their kernels; more BLAS threads than cores thrash.
    """
    if len(shares) == 1:
        return [work(shares[0])]
    with _BLAS.limit(limits=1, user_api="blas"):
        return list(thread_pool(len(shares)).map(work, shares))


def undirected_operator(
    blocks: list[EdgeBlock], weights: np.ndarray, n: int, threads: int = 1
) -> LinearOperator:
    """W = A + Aᵀ, with both products of a block done while its weights are still in cache.

    The products are bound by reading the weights from memory; a block's second read comes
    from the processor's cache (10-15 % faster than ``A x + Aᵀ x`` on ResNet-50's graph, and
    a large block is multiplied in pieces that fit: an eighth off ViT-H/14's products). With
    ``threads`` > 1 a large graph's blocks are shared out to that many threads, each with one
    BLAS thread (numpy releases the GIL in BLAS): a third faster on two cores for ViT-B/16,
    while BLAS's own threads gain nothing on matrix-vector products.
    """
    shares = shared_out(weight_blocks(blocks, weights), threads, weights.size)

    def product(x: np.ndarray, share: list[tuple]) -> np.ndarray:
        y = np.zeros(n)
        for part in share:
            push_and_pull(y, x, part)
        return y

    def both_ways(x: np.ndarray) -> np.ndarray:
        x = as_weights(x, weights)
        return sum(in_threads(lambda share: product(x, share), shares))

    return LinearOperator((n, n), both_ways, rmatvec=both_ways, dtype=np.float64)
