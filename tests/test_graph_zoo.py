"""Every torchvision classification model either gets a rolled graph or is refused by name."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from mlflow_tg.graph.build import RolledGraphBuilder
from mlflow_tg.graph.trace import GraphUnsupportedError

CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
# the architectures the rolled graph was extended for (shuffles, LayerNorm, layer scale, attention)
MODERN = [
    "vit_b_16",
    "swin_t",
    "convnext_tiny",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "maxvit_t",
]


def structure_only(name: str) -> nn.Module:
    """The model with weights on the meta device (no memory, no initialisation), when it allows.

    RegNet computes its widths from tensors while it is built, which the meta device cannot.
    """
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None, num_classes=10)
    except NotImplementedError:
        return torchvision.models.get_model(name, weights=None, num_classes=10)


def input_shape(name: str) -> tuple[int, int, int]:
    return (3, 299, 299) if name == "inception_v3" else (3, 224, 224)


def test_the_list_holds_the_modern_architectures():
    assert set(MODERN) <= set(CLASSIFIERS) and len(CLASSIFIERS) >= 80


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_torchvision_classifier_gets_a_graph_or_a_named_refusal(name: str):
    model = structure_only(name)
    try:
        builder = RolledGraphBuilder(model, input_shape(name))
    except GraphUnsupportedError as error:  # any other exception fails the test
        message = str(error)
        assert name not in MODERN, message
        assert "cannot represent" in message and (
            "in module '" in message or "own forward" in message
        )
        return
    assert builder.num_vertices > 10 and builder.num_edges > builder.num_vertices
    layers = builder.nodes["layer"]
    assert layers[0] == "input" and builder.nodes["layer_index"].max() == layers.n_unique() - 1
