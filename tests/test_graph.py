"""The rolled graph: hand-built networks against graphs written out by hand, real models counted."""

from __future__ import annotations

import math

import graph_tool as gt
import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.ops.misc import SqueezeExcitation

from mlflow_tg.graph.build import FLOAT32_FROM_EDGES, RolledGraphBuilder, weight_dtype
from mlflow_tg.graph.centrality import CENTRALITIES, compute_centralities
from mlflow_tg.graph.trace import GraphUnsupportedError
from mlflow_tg.graph.weights import NonFiniteWeightsError, block_weights
from mlflow_tg.train.models import build_model
from tests.conftest import CONF_DIR, compose_config


def labelled_edges(model: nn.Module, input_shape, **options) -> dict:
    """{(upstream (layer, channel), downstream (layer, channel)): weight} of the rolled graph."""
    builder = RolledGraphBuilder(model, input_shape, **options)
    graph = builder.build(model)
    layers, channels = builder.nodes["layer"].to_list(), builder.nodes["channel"].to_list()
    edges = {}
    for src, dst, weight in graph.get_edges([graph.ep["weight"]]):
        key = ((layers[int(src)], channels[int(src)]), (layers[int(dst)], channels[int(dst)]))
        assert key not in edges, f"parallel edge {key}"
        edges[key] = weight
    return edges


def assert_same_graph(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, weight in expected.items():
        assert actual[key] == pytest.approx(float(weight), rel=1e-6), key


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, so that folding has something to fold."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.dtype.is_floating_point:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return module


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().detach()


def test_mlp_edges_are_absolute_weights():
    model = seeded(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Dropout(), nn.Linear(2, 2)))
    w1, w2 = model[0].weight.detach(), model[3].weight.detach()
    expected = {(("input", i), ("0", o)): abs(w1[o, i]) for o in range(2) for i in range(3)}
    expected |= {(("0", i), ("3", o)): abs(w2[o, i]) for o in range(2) for i in range(2)}
    assert_same_graph(labelled_edges(model, (3,)), expected)


class ConvNet(nn.Module):
    """conv (2→3, 2×2) → BatchNorm → ReLU → max-pool → flatten → linear (3·2·2 → 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.conv(x))))  # (B, 3, 2, 2)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("fold", [True, False])
def test_conv_kernel_norms_batchnorm_fold_and_flatten_positions(fold: bool):
    model = seeded(ConvNet())
    w, fc = model.conv.weight.detach(), model.fc.weight.detach()
    scale = bn_scale(model.bn) if fold else torch.ones(3)
    expected = {
        (("input", j), ("conv", o)): w[o, j].norm() * scale[o] for o in range(3) for j in range(2)
    }
    # the flattened features of channel c are fc's columns 4c … 4c+3 (2×2 positions)
    expected |= {
        (("conv", c), ("fc", n)): fc[n, 4 * c : 4 * c + 4].norm()
        for n in range(2)
        for c in range(3)
    }
    assert_same_graph(labelled_edges(model, (2, 5, 5), fold_batchnorm=fold), expected)


def test_grouped_and_depthwise_convolutions_join_only_their_group():
    model = seeded(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, groups=4)))
    grouped, depthwise = model[0].weight.detach(), model[1].weight.detach()
    expected = {
        (("input", 2 * (o // 2) + j), ("0", o)): grouped[o, j].norm()
        for o in range(4)
        for j in range(2)
    }
    expected |= {(("0", o), ("1", o)): depthwise[o, 0].norm() for o in range(4)}
    assert_same_graph(labelled_edges(model, (4, 8, 8)), expected)


class Residual(nn.Module):
    """stem → [conv1 → conv2 → bn2] + shortcut(stem), where shortcut is identity or 1×1 conv."""

    def __init__(self, project: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 1)
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2)
        self.shortcut = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)) if project else None
        self.head = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = torch.relu(self.bn2(self.conv2(torch.relu(self.conv1(x)))) + shortcut)
        return self.head(out.mean([2, 3]))


def residual_expected(model: Residual) -> dict:
    """The edges every variant shares: block output channels are conv2's (bn2 folded in)."""
    stem, c1, c2 = (m.weight.detach() for m in (model.stem, model.conv1, model.conv2))
    s2, head = bn_scale(model.bn2), model.head.weight.detach()
    expected = {(("input", 0), ("stem", o)): stem[o, 0].norm() for o in range(2)}
    expected |= {(("stem", j), ("conv1", o)): c1[o, j].norm() for o in range(2) for j in range(2)}
    expected |= {
        (("conv1", j), ("conv2", o)): c2[o, j].norm() * s2[o] for o in range(2) for j in range(2)
    }
    expected |= {(("conv2", c), ("head", 0)): abs(head[0, c]) for c in range(2)}
    return expected


def test_identity_shortcut_joins_channel_i_to_channel_i_with_weight_one():
    model = seeded(Residual(project=False))
    expected = residual_expected(model) | {(("stem", i), ("conv2", i)): 1.0 for i in range(2)}
    assert_same_graph(labelled_edges(model, (1, 4, 4)), expected)


def test_layers_are_numbered_in_data_flow_order():
    # The shortcut runs before conv1 but its vertices are conv2's: it names no layer.
    builder = RolledGraphBuilder(Residual(project=True), (1, 4, 4))
    layers = builder.nodes.unique(["layer", "layer_index"], maintain_order=True).sort("layer_index")
    assert layers["layer"].to_list() == ["input", "stem", "conv1", "conv2", "head"]
    assert layers["layer_index"].to_list() == [0, 1, 2, 3, 4]


def test_a_sum_keeps_the_label_of_its_first_operand_even_beside_a_larger_merged_set():
    # c's vertices are kept and the merged a + b joins them: a set by size would be labelled a.
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.a, self.b = (nn.Conv2d(2, 3, 1) for _ in range(3))
            self.head = nn.Conv2d(3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.c(x) + (self.a(x) + self.b(x)))

    nodes = RolledGraphBuilder(Nested(), (2, 4, 4)).nodes
    assert nodes["layer"].to_list() == ["input"] * 2 + ["c"] * 3 + ["head"]


def test_projection_shortcut_is_a_1x1_conv_into_the_block_output():
    model = seeded(Residual(project=True))
    projection, scale = model.shortcut[0].weight.detach(), bn_scale(model.shortcut[1])
    expected = residual_expected(model) | {
        (("stem", j), ("conv2", o)): projection[o, j].norm() * scale[o]
        for o in range(2)
        for j in range(2)
    }
    assert_same_graph(labelled_edges(model, (1, 4, 4)), expected)


class Dense(nn.Module):
    """DenseNet-style: a = conv_a(x); y = conv_b(relu(bn(cat[x, a]))); gate-free."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(3)
        self.conv_b = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.cat([x, self.conv_a(x)], 1)
        return self.conv_b(torch.relu(self.bn(features)))


def test_batchnorm_of_a_concatenation_scales_the_edges_of_the_next_layer():
    model = seeded(Dense())
    a, b, scale = model.conv_a.weight.detach(), model.conv_b.weight.detach(), bn_scale(model.bn)
    sources = [("input", 0), ("conv_a", 0), ("conv_a", 1)]  # the concatenation's channels
    expected = {(("input", 0), ("conv_a", o)): a[o, 0].norm() for o in range(2)}
    expected |= {
        (source, ("conv_b", o)): b[o, j].norm() * scale[j]
        for o in range(2)
        for j, source in enumerate(sources)
    }
    assert_same_graph(labelled_edges(model, (1, 3, 3)), expected)


class Gated(nn.Module):
    """Squeeze-excitation: features × sigmoid(excite(relu(squeeze(avgpool(features)))))."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 2, 1)
        self.squeeze = nn.Conv2d(2, 1, 1)
        self.excite = nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.features(x))
        pooled = nn.functional.adaptive_avg_pool2d(features, 1)
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(pooled))))
        return gate * features


def test_gate_product_joins_the_gated_features_to_the_gate_channels():
    model = seeded(Gated())
    f, sq, ex = (m.weight.detach() for m in (model.features, model.squeeze, model.excite))
    expected = {(("input", 0), ("features", o)): f[o, 0].norm() for o in range(2)}
    expected |= {(("features", j), ("squeeze", 0)): sq[0, j].norm() for j in range(2)}
    expected |= {(("squeeze", 0), ("excite", o)): ex[o, 0].norm() for o in range(2)}
    expected |= {(("features", i), ("excite", i)): 1.0 for i in range(2)}
    assert_same_graph(labelled_edges(model, (1, 3, 3)), expected)


def test_sum_of_two_shared_tensors_gets_vertices_of_its_own():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            a = self.a(x)
            b = self.b(a)
            return torch.cat([a + b, b], 1)  # a and b are read elsewhere too

    builder = RolledGraphBuilder(Shared(), (1, 2, 2))
    kinds = builder.nodes.group_by("kind").len().sort("kind")
    assert dict(kinds.iter_rows()) == {"input": 1, "conv": 4, "add": 2}


class Transposed(nn.Module):
    """A convolution after a transpose: its channels are no longer on dimension 1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv(torch.transpose(self.stem(x), 1, 2))


class Reduced(nn.Module):
    """conv → ``reduce`` → flatten → linear on (B, 4, 4, 4) maps, where H == C."""

    def __init__(self, reduce, features: int) -> None:
        super().__init__()
        self.conv, self.reduce, self.fc = nn.Conv2d(1, 4, 1), reduce, nn.Linear(features, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.reduce(self.conv(x)), 1))


class LayerScale(nn.Module):
    """conv(x) · γ, with γ a learnable scale per channel and position: no per-channel scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gamma = nn.Conv2d(1, 2, 1), nn.Parameter(torch.ones(2, 2, 2))

    def forward(self, x):
        return self.conv(x) * self.gamma


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


@pytest.mark.parametrize(
    ("model", "input_shape", "named"),
    [
        (Transposed(), (1, 2, 2), "convolution 'conv' of a tensor whose channels are on"),
        (nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2)), (2,), "of type GroupNorm"),
        (nn.Sequential(nn.Conv2d(1, 2, 1), nn.Linear(2, 2)), (1, 2, 2), "non-flattened"),
        (DataDependent(), (2,), "torch.fx cannot trace DataDependent"),
        (nn.Sequential(nn.ReLU()), (2,), "no Conv or Linear layer"),
        (Reduced(lambda x: x.mean(1), 16), (1, 4, 4), "'mean' over dimensions [1]"),
        (Reduced(lambda x: torch.amax(x, dim=-3), 16), (1, 4, 4), "'amax' over dimensions [-3]"),
        (Reduced(lambda x: x.mean(dim=(1, 2)), 4), (1, 4, 4), "'mean' over dimensions (1, 2)"),
        (LayerScale(), (1, 2, 2), "learnable parameter 'gamma'"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.BatchNorm1d(8), nn.Linear(8, 2)),
            (1, 2, 2),
            "BatchNorm '2' of 8 flattened features of 2 channels",
        ),
    ],
)
def test_what_cannot_be_represented_fails_naming_the_operation(model, input_shape, named):
    with pytest.raises(GraphUnsupportedError) as error:
        RolledGraphBuilder(model, input_shape)
    assert named in str(error.value) and "graph.enabled=false" in str(error.value)


def test_reductions_over_positions_and_constant_scales_are_channel_wise():
    assert RolledGraphBuilder(Reduced(lambda x: x.mean((2, 3)), 4), (1, 4, 4)).graph.num_edges()
    scaled = RolledGraphBuilder(Reduced(lambda x: x * 2.0, 64), (1, 4, 4))
    assert scaled.graph.num_edges() == 4 + 2 * 4  # conv 1 → 4, fc from 4 channels to 2


def test_batchnorm_of_flattened_features_is_ignored_without_folding():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.BatchNorm1d(8), nn.Linear(8, 2))
    builder = RolledGraphBuilder(model, (1, 2, 2), fold_batchnorm=False)
    assert builder.build(model).num_edges() == 2 + 2 * 2


def test_batchnorm_after_a_flatten_of_single_positions_folds():
    model = seeded(
        nn.Sequential(
            nn.Conv2d(1, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(2),
            nn.Linear(2, 1),
        )
    ).eval()  # fmt: skip
    conv, scale = model[0].weight.detach(), bn_scale(model[3])
    expected = {(("input", 0), ("0", o)): abs(conv[o, 0, 0, 0]) * scale[o] for o in range(2)}
    expected |= {(("0", c), ("4", 0)): abs(model[4].weight[0, c].detach()) for c in range(2)}
    assert_same_graph(labelled_edges(model, (1, 3, 3)), expected)


def test_structure_is_traced_on_the_device_of_the_model():
    # meta stands in for an accelerator: the example input must live where the weights do
    on_cpu = RolledGraphBuilder(build_model("resnet", 2, 1, 16, 10), (1, 16, 16))
    model = build_model("resnet", 2, 1, 16, 10).to("meta")
    on_meta = RolledGraphBuilder(model, (1, 16, 16))
    assert on_meta.nodes.equals(on_cpu.nodes)
    assert on_meta.graph.num_edges() == on_cpu.graph.num_edges()
    # the weights are computed where they live (BatchNorm scales included), then moved to numpy
    for block in on_meta.plan.blocks:
        assert block_weights(model, block).shape == (len(block.outputs), block.per_group)


def test_non_finite_weights_name_the_layer():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    builder = RolledGraphBuilder(model, (2,))
    with torch.no_grad():
        model[2].weight[0, 0] = math.inf
    with pytest.raises(NonFiniteWeightsError, match=r"from 2$"):
        builder.build(model)


def test_weights_follow_training_and_tracing_changes_nothing():
    model = build_model("resnet", 2, 1, 16, 10)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    builder = RolledGraphBuilder(model, (1, 16, 16))
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    before = builder.build(model).ep["weight"].a.copy()
    with torch.no_grad():
        model.fc.weight.mul_(2)
    after = builder.build(model).ep["weight"].a
    changed = ~np.isclose(before, after)
    assert changed.sum() == model.fc.weight.numel()
    np.testing.assert_allclose(after[changed], 2 * before[changed], rtol=1e-6)


def conv_layers(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def expected_counts(model: nn.Module, flattened_positions: int = 1) -> tuple[int, int]:
    """Vertices and edges counted from the modules, independently of the tracer."""
    convs, linears = conv_layers(model), linear_layers(model)
    merged = [m for name, m in model.named_modules() if name.endswith("downsample.0")]
    vertices = 3 + sum(c.out_channels for c in convs if c not in merged)
    vertices += sum(lin.out_features for lin in linears)
    edges = sum(c.out_channels * c.in_channels // c.groups for c in convs)
    edges += linears[0].out_features * linears[0].in_features // flattened_positions
    edges += sum(lin.out_features * lin.in_features for lin in linears[1:])
    return vertices, edges


def resnet_identity_joins(model: torchvision.models.ResNet) -> int:
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    return sum(b.conv2.out_channels for b in blocks if b.downsample is None)


def mobilenet_joins(model: nn.Module) -> int:
    gates = sum(m.fc2.out_channels for m in model.modules() if isinstance(m, SqueezeExcitation))
    residuals = sum(
        m.out_channels
        for m in model.modules()
        if isinstance(m, InvertedResidual) and m.use_res_connect
    )
    return gates + residuals


@pytest.mark.parametrize(
    ("name", "joins", "positions"),
    [
        ("resnet18", resnet_identity_joins, 1),
        ("mobilenet_v3_small", mobilenet_joins, 1),
        ("densenet121", lambda model: 0, 1),
        ("vgg11", lambda model: 0, 49),  # its classifier reads a 7×7 average-pooled map
    ],
)
def test_torchvision_models_have_the_counted_vertices_and_edges(name, joins, positions):
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    builder = RolledGraphBuilder(model, (3, 32, 32))
    graph = builder.build(model)
    vertices, edges = expected_counts(model, positions)
    assert graph.num_vertices() == vertices
    assert graph.num_edges() == edges + joins(model)
    weights = graph.ep["weight"].a
    assert np.isfinite(weights).all() and (weights >= 0).all() and np.median(weights) > 0


def test_resnet18_downsample_edges_carry_the_projection_and_its_batchnorm():
    model = seeded(torchvision.models.resnet18(num_classes=10).eval())
    edges = labelled_edges(model, (3, 32, 32))
    block = model.layer2[0]
    projection, scale = block.downsample[0].weight.detach(), bn_scale(block.downsample[1])
    # layer1's output vertices are layer1.1.conv2's; layer2.0's are layer2.0.conv2's
    key = (("layer1.1.conv2", 5), ("layer2.0.conv2", 7))
    assert edges[key] == pytest.approx(float(projection[7, 5].norm() * scale[7]), rel=1e-6)
    stem = model.conv1.weight.detach()
    assert edges[(("input", 1), ("conv1", 4))] == pytest.approx(
        float(stem[4, 1].norm() * bn_scale(model.bn1)[4]), rel=1e-6
    )


@pytest.mark.parametrize("name", sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml")))
def test_every_configured_model_has_a_rolled_graph(name: str):
    cfg = compose_config([f"model={name}", "width=2"])
    options = {k: v for k, v in cfg.model.items() if k != "name"}
    model = build_model(name, 2, 1, 32, 10, **options)
    builder = RolledGraphBuilder(model, (1, 32, 32))
    graph = builder.build(model)
    vertices = 1 + sum(c.out_channels for c in conv_layers(model))
    vertices += sum(lin.out_features for lin in linear_layers(model))
    vertices -= sum(m[0].out_channels for n, m in model.named_modules() if n.endswith("shortcut")
                    and isinstance(m, nn.Sequential))  # fmt: skip
    assert graph.num_vertices() == vertices
    # data-flow order is the order the modules are declared in; projections merge into conv2
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    expected = ["input", *(name for name in layers if not name.endswith("shortcut.0"))]
    ordered = builder.nodes.unique(["layer", "layer_index"]).sort("layer_index")
    assert ordered["layer"].to_list() == expected
    assert ordered["layer_index"].to_list() == list(range(len(expected)))


class OneConvResidual(nn.Module):
    """x + conv(x): the identity join runs beside conv's own edge i → i (parallel edges)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(1, 3, 1), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return self.conv(x) + x


class Doubled(nn.Module):
    """A linear layer reading cat([x, x]): each of x's neurons joins each output twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.fc = nn.Linear(1, 2), nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(torch.cat([x, x], 1))


def one_conv_residual_expected(model: OneConvResidual) -> dict:
    """conv's own edge j → o plus, for o = j, the identity join of weight 1."""
    stem, conv = model.stem.weight.detach(), model.conv.weight.detach()
    expected = {(("input", 0), ("stem", o)): abs(stem[o, 0, 0, 0]) for o in range(3)}
    expected |= {
        (("stem", j), ("conv", o)): conv[o, j].norm() + (o == j) for o in range(3) for j in range(3)
    }
    return expected


def doubled_expected(model: Doubled) -> dict:
    """fc's columns j and j + 2 both read stem neuron j."""
    stem, fc = model.stem.weight.detach(), model.fc.weight.detach()
    expected = {(("input", 0), ("stem", o)): abs(stem[o, 0]) for o in range(2)}
    expected |= {
        (("stem", j), ("fc", o)): abs(fc[o, j]) + abs(fc[o, j + 2])
        for o in range(3)
        for j in range(2)
    }
    return expected


@pytest.mark.parametrize(
    ("model", "input_shape", "expected"),
    [
        (OneConvResidual(), (1, 4, 4), one_conv_residual_expected),
        (Doubled(), (1,), doubled_expected),
    ],
)
def test_parallel_edges_merge_into_one_edge_of_their_summed_weight(model, input_shape, expected):
    model = seeded(model)
    edges = expected(model)
    builder = RolledGraphBuilder(model, input_shape)
    assert_same_graph(labelled_edges(model, input_shape), edges)  # no parallel edge left
    # every centrality, path-based ones included, sees the graph written out by hand
    graph = builder.build(model)
    vertex = {
        (layer, channel): index
        for index, layer, channel in builder.nodes.select("node", "layer", "channel").iter_rows()
    }
    by_hand = gt.Graph(directed=False)
    by_hand.add_vertex(graph.num_vertices())
    by_hand.ep["weight"] = by_hand.new_edge_property("double")
    for (src, dst), weight in edges.items():
        by_hand.ep["weight"][by_hand.add_edge(vertex[src], vertex[dst])] = float(weight)
    n = graph.num_vertices()
    fast = compute_centralities(
        graph, CENTRALITIES, pivots=n, sources=n, adjacency=builder.adjacency()
    )
    reference = compute_centralities(by_hand, CENTRALITIES, pivots=n, sources=n)
    for name in CENTRALITIES:
        np.testing.assert_allclose(fast[name], reference[name], rtol=1e-6, atol=1e-12, err_msg=name)


class Repeated(nn.Module):
    """A grouped conv reading cat([x, x]): one vertex feeds a layer twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(1, 2, 1), nn.Conv2d(4, 4, 1, groups=2)

    def forward(self, x):
        x = self.stem(x)
        return self.conv(torch.cat([x, x], 1))


@pytest.mark.parametrize(
    ("model", "input_shape"),
    [
        (build_model("resnet", 2, 1, 16, 10), (1, 16, 16)),
        (OneConvResidual(), (1, 4, 4)),
        (Repeated(), (1, 2, 2)),
        (Dense(), (1, 3, 3)),
        (torchvision.models.mobilenet_v3_small(num_classes=10), (3, 32, 32)),
    ],
)
def test_block_products_equal_graph_tools_adjacency(model, input_shape):
    from graph_tool import GraphView, spectral

    builder = RolledGraphBuilder(seeded(model), input_shape)
    graph = builder.build(model)
    weight = graph.ep["weight"]
    undirected = spectral.adjacency(graph, weight=weight)
    flow = spectral.adjacency(GraphView(graph, directed=True), weight=weight)
    adjacency = builder.adjacency()
    x = np.random.default_rng(0).random((graph.num_vertices(), 3))
    np.testing.assert_allclose(adjacency.undirected @ x, undirected @ x, rtol=1e-12)
    np.testing.assert_allclose(adjacency.flow @ x, flow @ x, rtol=1e-12)
    np.testing.assert_allclose(adjacency.flow.T @ x, flow.T @ x, rtol=1e-12)


@pytest.mark.parametrize(
    ("model", "input_shape"),
    [
        (Dense(), (1, 3, 3)),
        (Repeated(), (1, 2, 2)),
        (torchvision.models.mobilenet_v3_small(num_classes=10), (3, 32, 32)),
    ],
)
def test_blocks_multiplied_piece_by_piece_give_the_same_products(model, input_shape, monkeypatch):
    from graph_tool import spectral

    from mlflow_tg.graph import operator

    monkeypatch.setattr(operator, "PIECE_BYTES", 16)  # every block of two rows or more in pieces
    monkeypatch.setattr(operator, "THREADED_FROM_EDGES", 0)  # and shared out to threads
    builder = RolledGraphBuilder(seeded(model), input_shape)
    graph = builder.build(model)
    assert any(block.edges * 8 > 16 for block in builder.plan.blocks)
    undirected = spectral.adjacency(graph, weight=graph.ep["weight"])
    x = np.random.default_rng(0).random(graph.num_vertices())
    for threads in (1, 2):
        product = builder.adjacency(threads).undirected @ x
        np.testing.assert_allclose(product, undirected @ x, rtol=1e-12)


def test_threads_share_out_the_refresh_without_changing_it(monkeypatch):
    from mlflow_tg.graph import operator

    monkeypatch.setattr(operator, "THREADED_FROM_EDGES", 0)
    model = seeded(torchvision.models.mobilenet_v3_small(num_classes=10))
    alone, shared = (RolledGraphBuilder(model, (3, 32, 32)) for _ in range(2))
    alone.refresh(model, threads=1)
    shared.refresh(model, threads=2)
    np.testing.assert_array_equal(shared.weights, alone.weights)
    with torch.no_grad():  # two layers far apart, so that each thread meets one of them
        model.features[0][0].weight[0, 0, 0, 0] = float("nan")
        model.classifier[3].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError) as error:
        shared.refresh(model, threads=2)
    assert str(error.value) == ("NaN or infinite edge weights from features.0.0, classifier.3"), (
        str(error.value)
    )


def test_threads_share_out_the_products_without_changing_them():
    from mlflow_tg.graph.operator import THREADED_FROM_EDGES

    model = seeded(torchvision.models.resnet18(num_classes=10))
    builder = RolledGraphBuilder(model, (3, 32, 32))
    builder.refresh(model)
    assert builder.weights.size >= THREADED_FROM_EDGES  # large enough to be shared out
    x = np.random.default_rng(0).random(builder.num_vertices)
    alone = builder.adjacency(threads=1).undirected @ x
    shared = builder.adjacency(threads=2).undirected @ x
    np.testing.assert_allclose(shared, alone, rtol=1e-12)


def test_large_graphs_hold_their_weights_in_float32():
    assert weight_dtype("auto", FLOAT32_FROM_EDGES - 1) == np.float64
    assert weight_dtype("auto", FLOAT32_FROM_EDGES) == np.float32
    assert weight_dtype("float64", FLOAT32_FROM_EDGES) == np.float64
    assert weight_dtype("float32", 10) == np.float32
    with pytest.raises(ValueError, match="precision='half'"):
        weight_dtype("half", 10)


def test_float32_centralities_agree_with_float64_ones():
    model = seeded(torchvision.models.mobilenet_v3_small(num_classes=10))
    names = ["strength", "eigenvector", "pagerank", "katz", "hits_authority"]
    results = {}
    for precision in ("float32", "float64"):
        builder = RolledGraphBuilder(model, (3, 32, 32), precision=precision)
        builder.refresh(model)
        assert builder.weights.dtype == precision
        adjacency = builder.adjacency()
        results[precision] = compute_centralities(lambda: None, names, adjacency=adjacency)
    for name in names:
        single, double = results["float32"][name], results["float64"][name]
        assert single.dtype == np.float64
        # relative to the largest value: float32 resolves ~1e-7, the solvers stop at 1e-6
        np.testing.assert_allclose(single, double, rtol=0, atol=1e-5 * double.max(), err_msg=name)


def test_centralities_from_block_products_equal_those_from_graph_tool_matrices():
    model = seeded(torchvision.models.mobilenet_v3_small(num_classes=10))
    builder = RolledGraphBuilder(model, (3, 32, 32))
    graph = builder.build(model)
    names = ["strength", "eigenvector", "pagerank", "katz", "hits_authority"]
    fast = compute_centralities(graph, names, adjacency=builder.adjacency())
    exported = compute_centralities(graph, names)
    for name in names:
        np.testing.assert_allclose(fast[name], exported[name], rtol=1e-6, atol=1e-12, err_msg=name)
