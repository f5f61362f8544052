"""The rolled graph of a PyTorch network: one vertex per input channel, conv channel or neuron.

The representation follows Vahedian et al. (CIKM 2022) and extends it to any network torch.fx
can trace:

- **vertices**: each input channel, each output channel of a convolution, each output neuron of
  a linear layer;
- **conv edges**: output channel ``o`` to input channel ``j`` with weight ``‖W[o, j, …]‖₂`` (L2 norm
  of the kernel slice); grouped and depthwise convolutions join each output channel to the input
  channels of its own group only;
- **linear edges**: ``|W[o, i]|``; after a flatten, each input *channel* joins each neuron with the
  L2 norm of the weights over that channel's spatial positions (one edge per channel-neuron pair);
- **activations, pooling, dropout, flatten** add nothing: they map channel ``i`` to channel ``i``;
- **concatenation** along channels keeps the vertices of every part;
- **addition and multiplication** of feature maps (residual shortcuts, squeeze-excitation gates)
  make one set of output vertices: an operand produced only for this operation (a block's last
  conv, a projection shortcut) *is* the output, so its edges enter the output's vertices; any
  other operand (an identity shortcut, the input of a gate) joins its channel ``i`` to output
  channel ``i`` with weight 1, the norm of an identity kernel. A projection shortcut is thus a
  1×1 conv whose edges enter the block's output vertices. When no operand is produced for the
  operation alone, the result gets vertices of its own (layer kind ``add``/``mul``);
- **BatchNorm** (``fold_batchnorm=True``): the per-channel scale ``|γ/√(var+ε)|`` multiplies the
  edges of the layer it follows, entering the normalised channels, as inference-time BN folding
  does. A BatchNorm that does not directly follow one layer (DenseNet's pre-activation norm of a
  concatenation) scales the edges leaving its channels into the next layer instead. Its shift
  (β, mean) is a bias and, like biases, no edge. With ``fold_batchnorm=False`` it adds nothing;
- **parallel edges** (a layer's own edge beside an identity join in ``x + conv(x)``, a layer
  reading ``cat([x, x])``) merge into one edge of their summed weight.

The graph is undirected for centralities; each edge is stored from the upstream to the downstream
vertex, so ``GraphView(g, directed=True)`` is the data flow. The structure is traced once
(``RolledGraphBuilder(model, input_shape)``); ``build(model)`` then only recomputes the edge
weights from the current parameters, vectorised per layer, and writes them into the same graph.
Anything the rules above cannot represent raises ``GraphUnsupportedError`` naming the module or
operation (a mean or max over the channels, a product with a learnable parameter such as a layer
scale, a folded BatchNorm of flattened features): a graph is never silently wrong.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import DisjointSet
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from mlflow_tg.errors import InputError

ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)  # fmt: skip
DROPOUTS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
CHANNELWISE_MODULES = ACTIVATIONS + POOLS + DROPOUTS
CHANNELWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.softplus, F.softmax, F.log_softmax, F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate,
    torch.mean, torch.amax, torch.flatten, torch.reshape,
}  # fmt: skip
# Reductions keep channels only when they reduce other dimensions than batch and channel; their
# output shape alone cannot tell (``x.mean(1)`` on (B, C, C, W) gives (B, C, W)).
REDUCTIONS = {torch.mean, torch.amax, "mean", "amax"}
CHANNELWISE_METHODS = {
    "relu", "sigmoid", "tanh", "mean", "amax", "flatten", "view", "reshape", "contiguous",
    "clone", "float", "to",
}  # fmt: skip
SUMS = {operator.add, operator.iadd, torch.add}
PRODUCTS = {operator.mul, operator.imul, torch.mul}
CATS = {torch.cat, torch.concat}


class GraphUnsupportedError(InputError):
    """A network (or one of its operations) that the rolled graph cannot represent."""


@dataclass
class ScaleTerm:
    """A BatchNorm scale not yet folded: value channel ``c`` is scaled by channel ``index[c]``."""

    batchnorm: str
    index: np.ndarray  # -1: this channel is not scaled by this BatchNorm


@dataclass
class EdgeBlock:
    """The edges of one layer: output channel o joins each input channel of o's group.

    Their weights, recomputed from the parameters at each snapshot, form an (out, in/groups)
    matrix: kernel-slice norms (``conv``), ``|w|`` or norms over flattened positions
    (``linear``), or ones (``join``: a grouped layer with one channel per group).
    """

    layer: str
    kind: str
    inputs: np.ndarray  # the vertex of each input channel
    outputs: np.ndarray  # the vertex of each output channel
    groups: int = 1
    positions: int = 1
    in_scale: list[ScaleTerm] = field(default_factory=list)  # BatchNorms before this layer
    out_folds: list[str] = field(default_factory=list)  # BatchNorms right after this layer
    repeated_inputs: bool = False  # a vertex feeds this layer twice (a layer reading cat([x, x]))

    @property
    def per_group(self) -> int:
        """Input channels each output channel joins."""
        return len(self.inputs) // self.groups

    @property
    def edges(self) -> int:
        """Number of edges."""
        return len(self.outputs) * self.per_group

    def edge_ends(self) -> tuple[np.ndarray, np.ndarray]:
        """(upstream, downstream) vertex of every edge, in the order of the weights."""
        out = len(self.outputs)
        group_start = np.arange(out) // (out // self.groups) * self.per_group  # (out,)
        src = self.inputs[group_start[:, None] + np.arange(self.per_group)]  # (out, in/groups)
        return src.ravel(), np.repeat(self.outputs, self.per_group)


@dataclass
class Value:
    """How one tensor of the forward pass maps onto vertices: ``vertices[c]`` is channel c.

    ``positions`` counts the features of each channel once flattened; ``scale`` holds BatchNorm
    scales waiting for the next layer; ``producer`` is the block that made these channels while
    a BatchNorm may still fold into it; ``root`` is the operation that created the vertices.
    """

    vertices: np.ndarray
    root: fx.Node | None
    positions: int = 1
    scale: list[ScaleTerm] = field(default_factory=list)
    producer: EdgeBlock | None = None

    @property
    def channels(self) -> int:
        """Number of channels (vertices)."""
        return len(self.vertices)


class Plan:
    """The traced structure: vertices with their labels, and edge blocks in weight order."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.layers: list[str] = []  # vertex layer name, by provisional vertex id
        self.kinds: list[str] = []
        self.channels: list[int] = []
        self.blocks: list[EdgeBlock] = []
        # Provisional vertex ids that sums made one vertex. DisjointSet picks a merged set's
        # root by size (in ``h(c(x) + (a(x) + b(x)))`` the sum's vertices would take layer a's
        # label, not c's), so ``leader`` records which vertex's label each merged set keeps.
        self.sets = DisjointSet()
        self.leader: dict[int, int] = {}  # root in ``sets`` → the vertex whose label it keeps

    def new_vertices(self, layer: str, kind: str, count: int) -> np.ndarray:
        """Create ``count`` vertices for the channels of ``layer``."""
        start = len(self.layers)
        self.layers += [layer] * count
        self.kinds += [kind] * count
        self.channels += range(count)
        for vertex in range(start, start + count):
            self.sets.add(vertex)
        return np.arange(start, start + count)

    def find(self, vertex: int) -> int:
        """Representative of a vertex: the one whose label its merged vertex keeps."""
        root = self.sets[vertex]
        return self.leader.get(root, root)

    def unify(self, keep: np.ndarray, merge: np.ndarray) -> None:
        """Make ``merge[c]`` the same vertex as ``keep[c]`` (which keeps its label) for each c."""
        for a, b in zip(keep.tolist(), merge.tolist(), strict=True):
            label = self.find(a)
            self.sets.merge(a, b)
            self.leader[self.sets[a]] = label


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` with torch.fx, turning its failure into a clear error."""
    try:
        return fx.symbolic_trace(model)
    except Exception as error:
        raise GraphUnsupportedError(
            f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error}), so "
            "its rolled graph cannot be derived. Networks with data-dependent control flow are "
            "not supported; run with graph.enabled=false to train without graph capture."
        ) from error


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has neither)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def tensor_shapes(gm: fx.GraphModule, model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    """Shape of every tensor of one forward pass, propagated with fake tensors.

    Fake tensors carry shapes without data: nothing is computed, so tracing a large network is
    fast and no BatchNorm statistic or random number generator is touched. The example input
    lives where the model does, as fake tensors keep the devices of the real ones.
    """
    modes = {module: module.training for module in model.modules()}
    example = torch.zeros(1, *input_shape, device=model_device(model))
    try:
        gm.eval()
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        ShapeProp(gm, fake_mode=fake_mode).propagate(example)
    finally:
        for module, training in modes.items():
            module.training = training
    return {
        node: tuple(node.meta["tensor_meta"].shape)
        for node in gm.graph.nodes
        if isinstance(node.meta.get("tensor_meta"), TensorMetadata)
    }


class Tracer:
    """Walks the fx graph once, mapping each tensor to vertices and each layer to edges."""

    def __init__(
        self, gm: fx.GraphModule, shapes: dict, fold_batchnorm: bool, model_name: str
    ) -> None:
        self.gm, self.shapes, self.fold_batchnorm = gm, shapes, fold_batchnorm
        self.parameters = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
        self.plan = Plan(model_name)
        self.values: dict[fx.Node, Value] = {}

    def run(self) -> Plan:
        """Visit every operation in execution order."""
        for node in self.gm.graph.nodes:
            if node.op in ("output", "get_attr") or node not in self.shapes:
                continue  # the output, constants and parameters, non-tensors such as x.size(0)
            self.values[node] = self.visit(node)
        if not self.plan.blocks:
            raise GraphUnsupportedError(
                f"{self.plan.model_name} has no Conv or Linear layer, so its rolled graph has no "
                "edges; run with graph.enabled=false."
            )
        return self.plan

    def visit(self, node: fx.Node) -> Value:
        """The value of one operation."""
        if node.op == "placeholder":
            if "input" in self.plan.layers:
                self.unsupported(node, "a second input")
            return Value(self.plan.new_vertices("input", "input", self.shapes[node][1]), None)
        inputs = [self.values[arg] for arg in node.all_input_nodes if arg in self.values]
        if node.op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(node.target), inputs)
        if node.op in ("call_function", "call_method"):
            return self.visit_function(node, inputs)
        return self.unsupported(node, f"a {node.op} operation")

    def visit_module(self, node: fx.Node, module: nn.Module, inputs: list[Value]) -> Value:
        """Layers make vertices and edges; BatchNorm folds; channel-wise modules pass through."""
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            return self.conv(node, module, self.single(node, inputs))
        if isinstance(module, nn.Linear):
            return self.linear(node, module, self.single(node, inputs))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self.batchnorm(node, module, self.single(node, inputs))
        if isinstance(module, (*CHANNELWISE_MODULES, nn.Flatten)):
            return self.channelwise(node, self.single(node, inputs))
        return self.unsupported(node, f"module {node.target!r} of type {type(module).__name__}")

    def visit_function(self, node: fx.Node, inputs: list[Value]) -> Value:
        """Sums, products, concatenation, and channel-wise functions and methods."""
        target = node.target
        if target in SUMS or target in PRODUCTS:
            return self.combine(node, inputs, "add" if target in SUMS else "mul")
        if target in CATS:
            return self.concatenate(node)
        if target in REDUCTIONS:
            self.check_reduction(node)
        if target in CHANNELWISE_FUNCTIONS or target in CHANNELWISE_METHODS:
            return self.channelwise(node, self.single(node, inputs))
        name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
        return self.unsupported(node, f"operation {name!r}")

    def check_reduction(self, node: fx.Node) -> None:
        """A mean or max must keep the batch and channel dimensions (``dim`` ≥ 2)."""
        positional = node.args[1] if len(node.args) > 1 else None
        dims = node.kwargs.get("dim", node.kwargs.get("axis", positional))
        dims = [dims] if isinstance(dims, int) else dims
        ndim = len(self.shapes[node.all_input_nodes[0]])
        known = isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims)
        # None or an empty tuple reduces every dimension, the channels with them
        if not known or not dims or any(d % ndim < 2 for d in dims):
            name = node.target if isinstance(node.target, str) else node.target.__name__
            self.unsupported(node, f"{name!r} over dimensions {dims} (mixing channels)")

    def single(self, node: fx.Node, inputs: list[Value]) -> Value:
        """The one tensor input of an operation."""
        if len(inputs) != 1:
            self.unsupported(node, f"{len(inputs)} tensor inputs where one was expected")
        return inputs[0]

    def unsupported(self, node: fx.Node, what: str) -> Value:
        """Raise the error that names the operation the graph cannot represent."""
        raise GraphUnsupportedError(
            f"the rolled graph of {self.plan.model_name} cannot represent {what} (at fx node "
            f"{node.name!r}). Supported: Conv/Linear layers, BatchNorm, activations, pooling, "
            "dropout, flatten, channel concatenation, and sums or products of feature maps; run "
            "with graph.enabled=false to train without graph capture."
        )

    def conv(self, node: fx.Node, module: nn.modules.conv._ConvNd, x: Value) -> Value:
        """Output channel o joins the input channels of its group: weight ‖W[o, j, …]‖₂."""
        if x.positions != 1:
            self.unsupported(node, f"convolution {node.target!r} of flattened features")
        outputs = self.plan.new_vertices(node.target, "conv", module.out_channels)
        return self.layer_output(node, x, outputs, "conv", module.groups)

    def linear(self, node: fx.Node, module: nn.Linear, x: Value) -> Value:
        """Neuron o joins each input channel: ``|w|``, or its L2 norm over flattened positions."""
        if len(self.shapes[node.all_input_nodes[0]]) != 2 or module.in_features != (
            x.channels * x.positions
        ):
            self.unsupported(node, f"linear layer {node.target!r} on a non-flattened tensor")
        outputs = self.plan.new_vertices(node.target, "linear", module.out_features)
        return self.layer_output(node, x, outputs, "linear", 1)

    def layer_output(self, node, x: Value, outputs: np.ndarray, kind: str, groups: int) -> Value:
        """Record a layer's edges; its output channels may still absorb a BatchNorm."""
        block = EdgeBlock(node.target, kind, x.vertices, outputs, groups, x.positions, x.scale)
        self.plan.blocks.append(block)
        return Value(outputs, node, producer=block)

    def batchnorm(self, node: fx.Node, module: nn.Module, x: Value) -> Value:
        """Fold the scale into the layer this BatchNorm follows, else into the next layer."""
        if not self.fold_batchnorm:
            return self.channelwise(node, x)
        if not module.track_running_stats:
            self.unsupported(
                node, f"BatchNorm {node.target!r} without running statistics (set "
                "graph.fold_batchnorm=false)"
            )  # fmt: skip
        if x.positions != 1 or module.num_features != x.channels:
            # a BatchNorm1d after a flatten scales each (channel, position) feature on its own
            self.unsupported(
                node, f"BatchNorm {node.target!r} of {module.num_features} flattened features "
                f"of {x.channels} channels (set graph.fold_batchnorm=false)"
            )  # fmt: skip
        if x.producer is not None and self.exclusive(x.root, node):
            x.producer.out_folds.append(node.target)
            return replace(x)
        term = ScaleTerm(node.target, np.arange(x.channels))
        return replace(x, scale=[*x.scale, term], producer=None)

    def channelwise(self, node: fx.Node, x: Value) -> Value:
        """Channel i to channel i; a flatten turns spatial positions into features per channel."""
        before, after = self.shapes[node.all_input_nodes[0]], self.shapes[node]
        # Shapes suffice here: a (row-major) reshape keeping (batch, channels) keeps each
        # channel's values together, and reductions over the channels were refused before.
        if after == before or (len(after) >= 2 and after[:2] == before[:2]):
            return replace(x)
        spatial = math.prod(before[2:])
        if len(before) > 2 and after == (before[0], before[1] * spatial):
            return replace(x, positions=x.positions * spatial)
        name = node.target if isinstance(node.target, str) else node.target.__name__
        return self.unsupported(node, f"{name!r} changing the shape {before} into {after}")

    def concatenate(self, node: fx.Node) -> Value:
        """Channels of every part, in order, with their pending BatchNorm scales."""
        parts = node.kwargs.get("tensors", node.args[0] if node.args else ())
        # the argument list, not node.all_input_nodes: cat([x, x]) has x twice
        inputs = [self.values[part] for part in parts]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if dim not in (1, -len(self.shapes[node]) + 1) or any(v.positions != 1 for v in inputs):
            self.unsupported(node, f"concatenation along dimension {dim}")
        scale, offset, total = [], 0, sum(v.channels for v in inputs)
        for part in inputs:
            for term in part.scale:
                index = np.full(total, -1)
                index[offset : offset + part.channels] = term.index
                scale.append(ScaleTerm(term.batchnorm, index))
            offset += part.channels
        return Value(np.concatenate([v.vertices for v in inputs]), None, 1, scale)

    def combine(self, node: fx.Node, inputs: list[Value], kind: str) -> Value:
        """A sum or product of feature maps: one output vertex per channel (module docstring)."""
        if len(inputs) == 1:  # plus or times a constant: a bias or a fixed scale, no vertices
            if kind == "mul":
                self.check_fixed_scale(node)
            return self.channelwise(node, inputs[0])
        if len({v.channels for v in inputs}) > 1 or any(v.positions != 1 for v in inputs):
            self.unsupported(node, f"a {kind} of tensors with different channels")
        own = [v for v in inputs if not v.scale and self.exclusive(v.root, node)]
        if own:
            outputs = own[0].vertices
            for other in own[1:]:
                self.plan.unify(outputs, other.vertices)
        else:
            outputs = self.plan.new_vertices(node.name, kind, inputs[0].channels)
        for joined in (v for v in inputs if not any(v is o for o in own)):
            self.plan.blocks.append(
                EdgeBlock(
                    node.name, "join", joined.vertices, outputs, groups=joined.channels,
                    in_scale=joined.scale,
                )
            )  # fmt: skip
        return Value(outputs, node)

    def check_fixed_scale(self, node: fx.Node) -> None:
        """A product with a learnable parameter (a layer scale) would weigh edges: refuse it."""
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg.target in self.parameters:
                self.unsupported(node, f"a product with the learnable parameter {arg.target!r}")

    def exclusive(self, root: fx.Node | None, target: fx.Node) -> bool:
        """Whether ``root``'s tensor reaches only ``target``, through channel-wise operations."""
        node = root
        while node is not None and node is not target:
            users = [user for user in node.users if user in self.shapes]
            if len(users) != 1:
                return False
            node = users[0]
            if node is not target and not self.is_channelwise(node):
                return False
        return node is target

    def is_channelwise(self, node: fx.Node) -> bool:
        """Whether an operation maps channel i to channel i (BatchNorm included)."""
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            return isinstance(
                module, (*CHANNELWISE_MODULES, nn.Flatten, nn.modules.batchnorm._BatchNorm)
            )
        return node.target in CHANNELWISE_FUNCTIONS or node.target in CHANNELWISE_METHODS
