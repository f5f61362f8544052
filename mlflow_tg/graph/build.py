"""The graph-tool graph of a traced network, built once and re-weighted at each capture."""

from __future__ import annotations

from functools import cached_property

import graph_tool as gt
import numpy as np
import polars as pl
import torch
from torch import nn

from mlflow_tg.graph.operator import (
    Adjacency,
    block_layers,
    flow_operator,
    in_threads,
    layer_space,
    shared_out,
    undirected_operator,
)
from mlflow_tg.graph.trace import (
    EdgeBlock,
    GraphUnsupportedError,
    Plan,
    Tracer,
    tensor_shapes,
    trace,
)
from mlflow_tg.graph.weights import NonFiniteWeightsError, block_weights

# Above this many edges the weights are held in float32. The spectral centralities read every
# weight from memory 80 to 100 times a capture, so half the bytes is nearly half the time; the
# solvers then stop at a relative residual of 1e-6 (float32 products resolve about 1e-7), which
# moves a centrality by less than 1e-5 of its largest value (tested), below what a summary shows.
FLOAT32_FROM_EDGES = 1 << 24
SOLVER_TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-6}


def weight_dtype(precision: str, edges: int) -> np.dtype:
    """float64 or float32 for ``precision`` "float64", "float32" or "auto" (by ``edges``)."""
    if precision == "auto":
        precision = "float32" if edges >= FLOAT32_FROM_EDGES else "float64"
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision={precision!r}: choose auto, float32 or float64")
    return np.dtype(precision)


def renumber(plan: Plan) -> np.ndarray:
    """Number the vertices left once sums merged theirs, in the blocks too; return their ids."""
    kept, final_id = np.unique(plan.representatives(), return_inverse=True)
    for block in plan.blocks:
        block.inputs, block.outputs = final_id[block.inputs], final_id[block.outputs]
        block.repeated_inputs = len(np.unique(block.inputs)) < len(block.inputs)
    return kept


def vertex_table(plan: Plan, kept: np.ndarray) -> pl.DataFrame:
    """One row per vertex: its layer, the layer's data-flow position, its kind and channel."""
    layers, kinds, starts, counts = zip(*plan.spans, strict=True)
    span = np.repeat(np.arange(len(plan.spans)), counts)[kept]  # each kept vertex's span
    # a layer's position: the order in which the kept vertices, by id, first meet it
    present = np.unique(span)
    order = {
        name: position for position, name in enumerate(dict.fromkeys(layers[s] for s in present))
    }
    layer_index = np.zeros(len(plan.spans), np.int32)
    layer_index[present] = [order[layers[s]] for s in present]
    return pl.DataFrame(
        {
            "node": np.arange(len(kept), dtype=np.int64),
            "layer": pl.Series(layers, dtype=pl.String).gather(span),
            "layer_index": layer_index[span],
            "kind": pl.Series(kinds, dtype=pl.String).gather(span),
            "channel": (kept - np.asarray(starts)[span]).astype(np.int32),
        }
    )


def block_edges(blocks: list[EdgeBlock]) -> np.ndarray:
    """(upstream, downstream) of every edge of every block, in weight order."""
    edges = np.empty((sum(block.edges for block in blocks), 2), np.uint64)
    start = 0
    for block in blocks:
        edges[start : start + block.edges, 0], edges[start : start + block.edges, 1] = (
            block.edge_ends()
        )
        start += block.edges
    return edges


def check_self_loops(plan: Plan) -> None:
    """Refuse a layer that would join a vertex to itself (a layer reading the sum it feeds)."""
    for block in plan.blocks:
        if np.intersect1d(block.inputs, block.outputs).size:
            src, dst = block.edge_ends()
            if (src == dst).any():
                raise GraphUnsupportedError(
                    f"the rolled graph of {plan.model_name} would join a vertex to itself (layer "
                    f"{block.layer!r} reading the sum it feeds); run with graph.enabled=false."
                )


def may_repeat_edges(blocks: list[EdgeBlock]) -> np.ndarray:
    """Which blocks may hold an edge of another (or one twice), as a mask over the blocks.

    Such parallel edges come from a layer reading ``cat([x, x])`` or from two blocks joining
    the same vertices to the same vertices (``x + conv(x)``). Checking blocks first keeps the
    exact search to a few small blocks instead of sorting every edge of the network.
    """
    # (vertex, block) for every block feeding the vertex, sorted by vertex: the blocks that
    # share an output vertex sit within a few places of each other
    fed = [np.unique(block.outputs) for block in blocks]
    vertex = np.concatenate(fed) if fed else np.zeros(0, np.int64)
    feeder = np.repeat(np.arange(len(blocks)), [len(outputs) for outputs in fed])
    order = np.lexsort((feeder, vertex))
    vertex, feeder = vertex[order], feeder[order]
    pairs = set()
    for offset in range(1, len(vertex)):
        same = vertex[offset:] == vertex[:-offset]
        if not same.any():
            break
        keys = np.unique(feeder[:-offset][same] * len(blocks) + feeder[offset:][same])
        pairs.update(zip(*divmod(keys, len(blocks)), strict=True))
    mask = np.array([block.repeated_inputs for block in blocks])
    for a, b in pairs:
        if np.intersect1d(blocks[a].inputs, blocks[b].inputs).size:
            mask[[a, b]] = True
    return mask


class ParallelEdges:
    """Which block edges repeat an earlier one (same vertex pair), found among suspects only.

    ``positions`` are the block edges of the suspect blocks, ``first`` the block edge each of
    them first occurs at; a block edge whose first occurrence is another is merged into it.
    """

    def __init__(self, blocks: list[EdgeBlock], n: int) -> None:
        offsets = np.cumsum([0, *(block.edges for block in blocks)])
        self.total = int(offsets[-1])
        suspects = np.flatnonzero(may_repeat_edges(blocks))
        self.positions = np.zeros(0, np.int64)
        self.first = self.positions
        if len(suspects):
            self.positions = np.concatenate(
                [np.arange(offsets[i], offsets[i + 1]) for i in suspects]
            )
            ends = [np.column_stack(blocks[i].edge_ends()).astype(np.uint64) for i in suspects]
            edges = np.concatenate(ends)
            keys = edges[:, 0] * np.uint64(n) + edges[:, 1]
            _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            self.first = self.positions[first[inverse.ravel()]]
        self.repeats = int((self.first != self.positions).sum())

    @property
    def distinct(self) -> int:
        """Number of edges once parallel ones are merged."""
        return self.total - self.repeats

    def merge(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Which block edges are distinct (a mask) and each block edge's distinct index.

        The index is None when no vertex pair repeats: the block edges are the graph's edges.
        """
        if not self.repeats:
            return np.ones(self.total, bool), None
        target = np.arange(self.total)
        target[self.positions] = self.first  # each edge → its first occurrence
        distinct = target == np.arange(self.total)
        return distinct, (np.cumsum(distinct) - 1)[target]


class RolledGraphBuilder:
    """The rolled graph of one model, traced once, with weights refreshed by ``refresh``.

    Parallel edges (a layer's own edge beside an identity join in ``x + conv(x)``, a layer
    reading ``cat([x, x])``) are merged into one edge of their summed weight, so that the
    path-based centralities see the same connection as the spectral ones. The graph-tool graph
    is built only when first asked for (``graph``): strength and the spectral centralities only
    need the per-layer weight blocks (``adjacency``), and on a large network the graph-tool
    graph costs more time and memory than everything else of a capture.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, ...],
        fold_batchnorm: bool = True,
        precision: str = "auto",
    ) -> None:
        gm = trace(model)
        shapes = tensor_shapes(gm, model, input_shape)
        self.plan = Tracer(gm, shapes, fold_batchnorm, type(model).__name__).run()
        self.nodes = vertex_table(self.plan, renumber(self.plan))
        check_self_loops(self.plan)
        self.parallel = ParallelEdges(self.plan.blocks, self.nodes.height)
        dtype = weight_dtype(precision, self.parallel.total)
        self.weights = np.zeros(self.parallel.total, dtype)  # per block edge, as last refreshed
        self._graph: gt.Graph | None = None
        self._merge: np.ndarray | None = None
        self._stale = True  # the graph's weights are older than ``weights``

    @cached_property
    def layer_of_vertex(self) -> np.ndarray:
        """The layer index of each vertex."""
        return self.nodes["layer_index"].to_numpy()

    @cached_property
    def block_layers(self) -> list[tuple[np.ndarray, ...]]:
        """The layers each block reads and writes: fixed by the trace, so found once."""
        return block_layers(self.plan.blocks, self.layer_of_vertex)

    @property
    def num_vertices(self) -> int:
        """Number of vertices."""
        return self.nodes.height

    @property
    def num_edges(self) -> int:
        """Number of edges, parallel ones merged."""
        return self.parallel.distinct

    @property
    def graph(self) -> gt.Graph:
        """The graph-tool graph with the weights of the last refresh, built on first use."""
        if self._graph is None:
            distinct, self._merge = self.parallel.merge()
            self._graph = self.make_graph(self.nodes, block_edges(self.plan.blocks)[distinct])
        if self._stale:
            merged = self.weights
            if self._merge is not None:
                merged = np.bincount(self._merge, self.weights, minlength=self.num_edges)
            self._graph.ep["weight"].a[:] = merged
            self._stale = False
        return self._graph

    @staticmethod
    def make_graph(nodes: pl.DataFrame, edges: np.ndarray) -> gt.Graph:
        """The graph-tool graph (structure only) with the labels of its vertices."""
        graph = gt.Graph(directed=False)
        graph.add_vertex(nodes.height)
        graph.add_edge_list(edges)  # uint64 ids: twice as fast as int64 in graph-tool 2.45
        graph.ep["weight"] = graph.new_edge_property("double")
        graph.vp["layer"] = graph.new_vertex_property("string", vals=nodes["layer"])
        graph.vp["layer_index"] = graph.new_vertex_property("int", vals=nodes["layer_index"])
        graph.vp["channel"] = graph.new_vertex_property("int", vals=nodes["channel"])
        return graph

    def refresh(self, model: nn.Module, threads: int = 1) -> None:
        """Recompute every block edge's weight from ``model``'s current parameters, in place.

        ``threads`` share out the blocks of a large network (torch releases the GIL): the first
        refresh of a large model is mostly the first writes to fresh memory.

        Raises:
            NonFiniteWeightsError: naming the layers whose weights are NaN or infinite.
        """
        slices, start = [], 0
        for number, block in enumerate(self.plan.blocks):
            slices.append((number, block, self.weights[start : start + block.edges]))
            start += block.edges

        def fill(share: list[tuple]) -> list[int]:
            bad = []
            with torch.no_grad():  # thread-local: each worker turns autograd off for itself
                for number, block, part in share:
                    # straight into the numpy array (on an accelerator: computed there, copied)
                    out = torch.from_numpy(part).view(len(block.outputs), block.per_group)
                    block_weights(model, block, out)
                    if not np.isfinite(part).all():
                        bad.append(number)
            return bad

        shares = shared_out(slices, threads, self.weights.size, size=lambda item: item[1].edges)
        bad = sorted(number for found in in_threads(fill, shares) for number in found)
        self._stale = True
        if bad:
            layers = ", ".join(self.plan.blocks[number].layer for number in bad)
            raise NonFiniteWeightsError(f"NaN or infinite edge weights from {layers}")

    def build(self, model: nn.Module) -> gt.Graph:
        """The graph-tool graph with the weights of ``model`` as it is now."""
        self.refresh(model)
        return self.graph

    def adjacency(self, threads: int = 1) -> Adjacency:
        """The weighted adjacency of the graph as last refreshed, as fast block products.

        ``threads`` share out the products of W (those of the spectral centralities).
        """
        blocks, n = self.plan.blocks, self.num_vertices
        return Adjacency(
            undirected_operator(blocks, self.weights, n, threads),
            flow_operator(blocks, self.weights, n),
            SOLVER_TOLERANCE[self.weights.dtype],
            layer_space(blocks, self.weights, self.layer_of_vertex, self.block_layers, threads),
        )
