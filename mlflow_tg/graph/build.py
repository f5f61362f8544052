"""The graph-tool graph of a traced network, built once and re-weighted at each capture."""

from __future__ import annotations

import itertools

import graph_tool as gt
import numpy as np
import polars as pl
import torch
from torch import nn

from mlflow_tg.graph.operator import Adjacency, flow_operator
from mlflow_tg.graph.trace import (
    EdgeBlock,
    GraphUnsupportedError,
    Plan,
    Tracer,
    tensor_shapes,
    trace,
)
from mlflow_tg.graph.weights import NonFiniteWeightsError, block_weights


def renumber(plan: Plan) -> np.ndarray:
    """Number the vertices left once sums merged theirs, in the blocks too; return their ids."""
    roots = np.array([plan.find(v) for v in range(len(plan.layers))])
    kept, final_id = np.unique(roots, return_inverse=True)
    for block in plan.blocks:
        block.inputs, block.outputs = final_id[block.inputs], final_id[block.outputs]
        block.repeated_inputs = len(np.unique(block.inputs)) < len(block.inputs)
    return kept


def vertex_table(plan: Plan, kept: np.ndarray) -> pl.DataFrame:
    """One row per vertex: its layer, the layer's data-flow position, its kind and channel."""
    layers = [plan.layers[v] for v in kept]
    layer_order = {name: index for index, name in enumerate(dict.fromkeys(layers))}
    return pl.DataFrame(
        {
            "node": np.arange(len(kept), dtype=np.int64),
            "layer": layers,
            "layer_index": [layer_order[name] for name in layers],
            "kind": [plan.kinds[v] for v in kept],
            "channel": [plan.channels[v] for v in kept],
        },
        schema_overrides={"layer_index": pl.Int32, "channel": pl.Int32},
    )


def block_edges(plan: Plan) -> np.ndarray:
    """(upstream, downstream) of every edge of every block, in weight order."""
    edges = np.empty((sum(block.edges for block in plan.blocks), 2), np.uint64)
    start = 0
    for block in plan.blocks:
        edges[start : start + block.edges, 0], edges[start : start + block.edges, 1] = (
            block.edge_ends()
        )
        start += block.edges
    if (edges[:, 0] == edges[:, 1]).any():
        raise GraphUnsupportedError(
            f"the rolled graph of {plan.model_name} would join a vertex to itself (a layer "
            "reading the sum it feeds); run with graph.enabled=false."
        )
    return edges


def may_repeat_edges(blocks: list[EdgeBlock]) -> np.ndarray:
    """Which blocks may hold an edge of another (or one twice), as a mask over the blocks.

    Such parallel edges come from a layer reading ``cat([x, x])`` or from two blocks joining
    the same vertices to the same vertices (``x + conv(x)``). Checking blocks first keeps the
    exact search to a few small blocks instead of sorting every edge of the network.
    """
    feeders: dict[int, set[int]] = {}
    for index, block in enumerate(blocks):
        for vertex in np.unique(block.outputs).tolist():
            feeders.setdefault(vertex, set()).add(index)
    pairs = {pair for fed in feeders.values() for pair in itertools.combinations(sorted(fed), 2)}
    mask = np.array([block.repeated_inputs for block in blocks])
    for a, b in pairs:
        if np.intersect1d(blocks[a].inputs, blocks[b].inputs).size:
            mask[[a, b]] = True
    return mask


def merge_parallel(
    blocks: list[EdgeBlock], edges: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """The distinct edges (in first occurrence order) and each block edge's index among them.

    The index is None when no vertex pair repeats: the block edges are then the graph's edges.
    """
    suspects = np.flatnonzero(may_repeat_edges(blocks))
    if not len(suspects):
        return edges, None
    offsets = np.cumsum([0, *(block.edges for block in blocks)])
    positions = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in suspects])
    keys = edges[positions, 0] * np.uint64(n) + edges[positions, 1]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if len(first) == len(keys):
        return edges, None
    target = np.arange(len(edges))
    target[positions] = positions[first[inverse.ravel()]]  # each edge → its first occurrence
    distinct = target == np.arange(len(edges))
    return edges[distinct], (np.cumsum(distinct) - 1)[target]


class RolledGraphBuilder:
    """The rolled graph of one model, traced once, with weights refreshed by ``build``.

    Parallel edges (a layer's own edge beside an identity join in ``x + conv(x)``, a layer
    reading ``cat([x, x])``) are merged into one edge of their summed weight, so that the
    path-based centralities see the same connection as the spectral ones.
    """

    def __init__(
        self, model: nn.Module, input_shape: tuple[int, ...], fold_batchnorm: bool = True
    ) -> None:
        gm = trace(model)
        shapes = tensor_shapes(gm, model, input_shape)
        self.plan = Tracer(gm, shapes, fold_batchnorm, type(model).__name__).run()
        self.nodes = vertex_table(self.plan, renumber(self.plan))
        edges = block_edges(self.plan)
        distinct, self.merge = merge_parallel(self.plan.blocks, edges, self.nodes.height)
        self.graph = self.make_graph(self.nodes, distinct)
        self.weights = np.zeros(len(edges))  # per block edge, as last built

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

    def edge_weights(self, model: nn.Module) -> np.ndarray:
        """Every block edge's weight from ``model``'s current parameters, in block order."""
        weights, start = np.empty(len(self.weights)), 0
        with torch.no_grad():
            for block in self.plan.blocks:
                # .cpu(): the model may live on an accelerator, the graph lives in numpy
                weights[start : start + block.edges] = block_weights(model, block).cpu().ravel()
                start += block.edges
        if not np.isfinite(weights).all():
            bad, start = [], 0
            for block in self.plan.blocks:
                if not np.isfinite(weights[start : start + block.edges]).all():
                    bad.append(block.layer)
                start += block.edges
            raise NonFiniteWeightsError(f"NaN or infinite edge weights from {', '.join(bad)}")
        return weights

    def build(self, model: nn.Module) -> gt.Graph:
        """The graph with the weights of ``model`` as it is now."""
        self.weights = self.edge_weights(model)
        merged = self.weights
        if self.merge is not None:
            merged = np.bincount(self.merge, self.weights, minlength=self.graph.num_edges())
        self.graph.ep["weight"].a[:] = merged
        return self.graph

    def adjacency(self) -> Adjacency:
        """The weighted adjacency of the graph as last built, as fast block products."""
        flow = flow_operator(self.plan.blocks, self.weights, self.graph.num_vertices())
        return Adjacency.from_flow(flow)
