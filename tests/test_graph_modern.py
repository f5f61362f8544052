"""Rolled graphs of modern blocks: shuffles, LayerNorm, layer scales and attention by hand.

Small torchvision transformers and modern ConvNets are counted from their modules; the fixed
bugs (other dtypes, bad input shapes, a concatenated buffer, a module used twice, softmax over
channels) each have a test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlock, CNBlockConfig, ConvNeXt, LayerNorm2d
from torchvision.models.efficientnet import MBConv
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import SqueezeExcitation

from mlflow_tg.graph.build import RolledGraphBuilder
from mlflow_tg.graph.trace import GraphUnsupportedError
from tests.test_graph import assert_same_graph, labelled_edges, seeded


def weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()


class Shuffled(nn.Module):
    """conv (1 → 4) → ShuffleNet's channel shuffle in 2 groups → 1×1 conv (4 → 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 1), nn.Conv2d(4, 1, 1)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return self.head(x.view(b, c, h, w))


def test_channel_shuffle_is_a_vertex_permutation():
    model = seeded(Shuffled())
    conv, head = weight(model.conv), weight(model.head)
    # shuffled channel k is conv channel perm[k]: (group i, index j) → position j·2 + i
    perm = [0, 2, 1, 3]
    expected = {(("input", 0), ("conv", o)): abs(conv[o, 0, 0, 0]) for o in range(4)}
    expected |= {(("conv", perm[k]), ("head", 0)): abs(head[0, k, 0, 0]) for k in range(4)}
    assert_same_graph(labelled_edges(model, (1, 3, 3)), expected)


class ConvNeXtLike(nn.Module):
    """stem conv → torchvision's CNBlock (depthwise conv, permute, LayerNorm, two linear layers,
    layer scale, stochastic depth, residual) → LayerNorm2d → global mean → linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 1)
        self.block = CNBlock(2, layer_scale=0.5, stochastic_depth_prob=0.5)
        self.norm = LayerNorm2d(2)
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.norm(self.block(self.stem(x))).mean((2, 3)))


def test_layernorm_and_layer_scale_fold_into_the_edges_they_scale():
    model = seeded(ConvNeXtLike()).eval()
    dw, ln, fc1, fc2 = model.block.block[0], model.block.block[2], *model.block.block[3:6:2]
    stem, scale, head = weight(model.stem), model.block.layer_scale.detach().abs().flatten(), None
    gamma, head = weight(ln).abs(), weight(model.head)
    expected = {(("input", 0), ("stem", o)): abs(stem[o, 0, 0, 0]) for o in range(2)}
    # LayerNorm follows the depthwise conv alone: its |γ| scales the conv's edges
    expected |= {
        (("stem", o), ("block.block.0", o)): weight(dw)[o, 0].norm() * gamma[o] for o in range(2)
    }
    expected |= {
        (("block.block.0", j), ("block.block.3", o)): abs(weight(fc1)[o, j])
        for o in range(8)
        for j in range(2)
    }
    # the layer scale multiplies the second linear layer's edges; the sum keeps its vertices
    expected |= {
        (("block.block.3", j), ("block.block.5", o)): abs(weight(fc2)[o, j]) * scale[o]
        for o in range(2)
        for j in range(8)
    }
    expected |= {(("stem", i), ("block.block.5", i)): 1.0 for i in range(2)}
    # LayerNorm2d of the sum (read by nothing else) scales the edges leaving its channels
    final = weight(model.norm).abs()
    expected |= {(("block.block.5", c), ("head", 0)): abs(head[0, c]) * final[c] for c in range(2)}
    assert_same_graph(labelled_edges(model, (1, 3, 3)), expected)


class Attention(nn.Module):
    """conv1d stem → tokens (permute) → LayerNorm → self-attention → residual → class token."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 4, 1)
        self.ln = nn.LayerNorm(4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 1)
        y = self.ln(x)
        y, _ = self.attention(y, y, y, need_weights=False)
        return self.head((x + y)[:, 0])


def test_attention_is_a_value_projection_then_an_output_projection():
    model = seeded(Attention())
    stem, gamma, head = weight(model.stem), weight(model.ln).abs(), weight(model.head)
    value = model.attention.in_proj_weight.detach()[8:]
    out = weight(model.attention.out_proj)
    expected = {(("input", 0), ("stem", o)): abs(stem[o, 0, 0]) for o in range(4)}
    # the LayerNorm's input is also the shortcut, so its |γ| scales the edges leaving it
    expected |= {
        (("stem", j), ("attention.value", o)): abs(value[o, j]) * gamma[j]
        for o in range(4)
        for j in range(4)
    }
    expected |= {
        (("attention.value", j), ("attention.out_proj", o)): abs(out[o, j])
        for o in range(4)
        for j in range(4)
    }
    expected |= {(("stem", i), ("attention.out_proj", i)): 1.0 for i in range(4)}
    expected |= {
        (("attention.out_proj", c), ("head", o)): abs(head[o, c])
        for o in range(2)
        for c in range(4)
    }
    assert_same_graph(labelled_edges(model, (1, 5)), expected)


def test_stochastic_depth_is_the_identity_on_channels():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), StochasticDepth(0.5, "row"), nn.Conv2d(2, 3, 1))
    assert RolledGraphBuilder(model, (1, 2, 2)).build(model).num_edges() == 2 + 6


def count_linear(model: nn.Module) -> tuple[int, int]:
    """Output vertices and edges of every nn.Linear that is not inside an attention block."""
    linears = [
        m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".attn." not in f".{n}."
    ]
    linears = [
        m for m in linears if not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)
    ]
    return sum(m.out_features for m in linears), sum(
        m.out_features * m.in_features for m in linears
    )


def test_small_vision_transformer_has_the_counted_vertices_and_edges():
    model = VisionTransformer(
        32, 16, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )
    graph = RolledGraphBuilder(model, (3, 32, 32)).build(model)
    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    linear_vertices, linear_edges = count_linear(model)
    # per attention: value and output projections of 8 × 8; two identity joins per block
    vertices = 3 + 8 + linear_vertices + 2 * 8 * len(attentions)
    edges = 3 * 8 + linear_edges + len(attentions) * (2 * 64 + 2 * 8)
    assert (graph.num_vertices(), graph.num_edges()) == (vertices, edges)


def test_small_swin_transformer_has_the_counted_vertices_and_edges():
    model = SwinTransformer(
        [4, 4], 8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2], num_classes=3
    )
    graph = RolledGraphBuilder(model, (3, 16, 16)).build(model)
    blocks = [m for n, m in model.named_modules() if n.endswith(".attn")]
    widths = [b.proj.in_features for b in blocks]
    linear = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".attn." not in n]
    merging = [m for n, m in model.named_modules() if n.endswith(".reduction")]
    vertices = 3 + 8 + sum(m.out_features for m in linear) + sum(2 * w for w in widths)
    # patch merging reads each channel at 4 positions: its 4 parallel edges merge into one
    edges = 3 * 8 + sum(m.out_features * m.in_features for m in linear)
    edges -= sum(m.out_features * m.in_features * 3 // 4 for m in merging)
    edges += sum(2 * w * w + 2 * w for w in widths)  # value, proj, two identity joins per block
    assert (graph.num_vertices(), graph.num_edges()) == (vertices, edges)


def test_small_convnext_has_the_counted_vertices_and_edges():
    setting = [CNBlockConfig(4, 8, 1), CNBlockConfig(8, None, 1)]
    model = ConvNeXt(setting, num_classes=3)
    graph = RolledGraphBuilder(model, (3, 32, 32)).build(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    vertices = 3 + sum(c.out_channels for c in convs) + sum(m.out_features for m in linears)
    edges = sum(c.out_channels * c.in_channels // c.groups for c in convs)
    edges += sum(m.out_features * m.in_features for m in linears) + 4 + 8  # one join per block
    assert (graph.num_vertices(), graph.num_edges()) == (vertices, edges)


# --- the bugs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_floating_point_types_trace_and_weigh_like_float32(dtype):
    reference = seeded(ConvNeXtLike()).eval()
    model = seeded(ConvNeXtLike()).eval().to(dtype)
    expected = labelled_edges(reference, (1, 3, 3))
    actual = labelled_edges(model, (1, 3, 3))
    assert set(actual) == set(expected)
    tolerance = 1e-6 if dtype == torch.float64 else 2e-2
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=tolerance), key


def test_an_input_shape_that_does_not_fit_is_one_clear_paragraph(capfd):
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(GraphUnsupportedError) as error:
        RolledGraphBuilder(model, (4,))
    message = str(error.value)
    assert "shape (1, 4) and type float32 at module '0'" in message
    assert "data.image_size" in message and "\n" not in message
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("norm", "named"),
    [(nn.BatchNorm2d(5), "module '1'"), (nn.BatchNorm1d(4), "module '1'")],
    ids=["wrong channels", "wrong dimensions"],
)
def test_a_batchnorm_that_does_not_fit_its_input_is_refused(norm, named):
    # BatchNorm's shape is taken from its input without running it: only when it fits
    model = nn.Sequential(nn.Conv2d(3, 4, 1), norm, nn.Flatten(), nn.Linear(36, 2))
    with pytest.raises(GraphUnsupportedError, match=named):
        RolledGraphBuilder(model, (3, 3, 3))


class WithBuffer(nn.Module):
    """A conv reading its input concatenated with a fixed coordinate map (a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("coords", torch.ones(1, 2, 3, 3))
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], 1))


def test_concatenating_a_buffer_gives_it_vertices_of_its_own():
    model = seeded(WithBuffer())
    conv = weight(model.conv)
    sources = [("input", 0), ("coords", 0), ("coords", 1)]
    expected = {
        (source, ("conv", o)): abs(conv[o, j, 0, 0])
        for o in range(2)
        for j, source in enumerate(sources)
    }
    assert_same_graph(labelled_edges(model, (1, 3, 3)), expected)


class Twice(nn.Module):
    """The same linear layer applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(2, 2), nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.fc(torch.relu(self.fc(x))))


def test_a_module_applied_twice_makes_two_layers():
    model = seeded(Twice())
    builder = RolledGraphBuilder(model, (2,))
    layers = builder.nodes.unique(["layer", "layer_index"], maintain_order=True)
    assert layers["layer"].to_list() == ["input", "fc", "fc#2", "head"]
    assert layers["layer_index"].to_list() == [0, 1, 2, 3]
    fc = weight(model.fc)
    edges = labelled_edges(model, (2,))
    assert edges[(("fc", 1), ("fc#2", 0))] == pytest.approx(float(abs(fc[0, 1])))


class Block(nn.Module):
    def __init__(self, mix) -> None:
        super().__init__()
        self.conv, self.mix = nn.Conv2d(2, 2, 1), mix

    def forward(self, x):
        return self.mix(self.conv(x))


class Nested(nn.Module):
    """stem → features.block (conv, then ``mix``) → flatten → head: ``mix`` sits mid-network."""

    def __init__(self, mix) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("block", Block(mix))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


@pytest.mark.parametrize(
    ("mix", "named"),
    [
        (lambda x: nn.functional.softmax(x, dim=1), "'softmax' over dimension 1"),
        (nn.Softmax(dim=1), "'features.block.mix'"),
        (lambda x: x.mean(1, keepdim=True).expand_as(x), "'mean' over dimensions [1]"),
    ],
)
def test_operations_mixing_channels_are_refused_naming_module_and_operation(mix, named):
    with pytest.raises(GraphUnsupportedError) as error:
        RolledGraphBuilder(Nested(mix), (2, 2, 2))
    message = str(error.value)
    assert named in message and "in module 'features.block" in message


def test_softmax_over_positions_and_of_the_logits_is_channel_wise():
    positions = RolledGraphBuilder(Nested(lambda x: x.softmax(-1)), (2, 2, 2))
    assert positions.graph.num_edges() == 4 + 2 * 2
    logits = nn.Sequential(nn.Linear(2, 3), nn.Softmax(dim=1))
    assert RolledGraphBuilder(logits, (2,)).graph.num_edges() == 6


def meta_model(name: str) -> nn.Module:
    """A torchvision classifier with weights on the meta device: structure without memory."""
    with torch.device("meta"):
        return torchvision.models.get_model(name, weights=None, num_classes=10)


def efficientnet_joins(model: nn.Module) -> int:
    """Identity joins: one per channel of each gate and of each residual block."""
    gates = sum(m.fc2.out_channels for m in model.modules() if isinstance(m, SqueezeExcitation))
    residuals = sum(
        m.out_channels for m in model.modules() if isinstance(m, MBConv) and m.use_res_connect
    )
    return gates + residuals


@pytest.mark.parametrize(
    ("name", "joins"),
    [("efficientnet_b0", efficientnet_joins), ("shufflenet_v2_x0_5", lambda model: 0)],
)
def test_modern_convnets_have_the_counted_vertices_and_edges(name, joins):
    model = meta_model(name)
    builder = RolledGraphBuilder(model, (3, 224, 224))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    vertices = 3 + sum(c.out_channels for c in convs) + sum(m.out_features for m in linears)
    edges = sum(c.out_channels * c.in_channels // c.groups for c in convs)
    edges += sum(m.out_features * m.in_features for m in linears) + joins(model)
    assert (builder.num_vertices, builder.num_edges) == (vertices, edges)


class ChannelsLastFlatten(nn.Module):
    """Flattening a channels-last map puts each pixel's channels together: positions-major."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 1), nn.Linear(8, 1)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x).permute(0, 2, 3, 1), 1))


def test_a_reshape_mixing_channels_with_positions_is_refused():
    with pytest.raises(
        GraphUnsupportedError, match=r"'flatten': a reshape of .* mixing the channels"
    ):
        RolledGraphBuilder(ChannelsLastFlatten(), (1, 2, 2))


def test_spectral_centralities_never_build_the_graph_tool_graph():
    from mlflow_tg.graph.centrality import compute_centralities

    model = seeded(Attention())
    builder = RolledGraphBuilder(model, (1, 5))
    builder.refresh(model)

    def no_graph():
        raise AssertionError("the graph-tool graph was built")

    names = ["strength", "eigenvector", "pagerank", "katz", "hits_authority"]
    fast = compute_centralities(no_graph, names, adjacency=builder.adjacency())
    exported = compute_centralities(builder.graph, names)
    for name in names:
        np.testing.assert_allclose(fast[name], exported[name], rtol=1e-6, atol=1e-12, err_msg=name)
    assert builder.num_edges == builder.graph.num_edges()
