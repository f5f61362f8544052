"""Width-parametrised networks: mlp, lenet, vgg (VGG-11-like) and a CIFAR-style ResNet-18.

Every builder takes the data's shape (channels, image size, classes) and a ``width`` knob, so the
same config trains on 8×8 digits resized to 32 or on CIFAR-10, and a sweep over ``width`` scales
the whole network. Each ``conf/model/*.yaml`` names its builder as ``_target_``. A builder refuses
an image size its pooling would shrink to nothing (ValueError); the config check builds the model
on the meta device to find that out before any data is loaded.

``torchvision_model`` builds any torchvision classification model by name, sized to the data the
same way (``model=torchvision model.arch=resnet18``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

VGG11_STAGES = ((1,), (2,), (4, 4), (8, 8), (8, 8))  # channel multipliers of width, per stage


def mlp(
    width: int,
    in_channels: int,
    image_size: int,
    num_classes: int,
    hidden_multipliers: tuple[int, ...] = (8, 4),
    dropout: float = 0.0,
) -> nn.Module:
    """A fully connected network with hidden layers of ``width * m`` neurons."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_channels * image_size * image_size
    for multiplier in hidden_multipliers:
        layers += [nn.Linear(fan_in, width * multiplier), nn.ReLU(), nn.Dropout(dropout)]
        fan_in = width * multiplier
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def lenet(
    width: int,
    in_channels: int,
    image_size: int,
    num_classes: int,
    dropout: float = 0.0,
) -> nn.Module:
    """LeNet-5 sized by ``width``; width 6 is close to the original.

    Two 5×5 conv + max-pool stages (``width``, ``2·width`` channels), then three linear layers
    (``8·width``, ``4·width``, classes).
    """
    spatial = ((image_size - 4) // 2 - 4) // 2
    if spatial < 1:
        raise ValueError(f"lenet needs images of at least 16×16 pixels, got {image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * spatial * spatial, 8 * width),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(8 * width, 4 * width),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(4 * width, num_classes),
    )


def vgg(
    width: int,
    in_channels: int,
    image_size: int,
    num_classes: int,
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """VGG-11 with channels ``width·(1, 2, 4, 4, 8, 8, 8, 8)``; width 64 is the original.

    Five max-pools, global average pooling and a two-layer classifier.
    """
    if image_size < 32:
        raise ValueError(
            f"vgg pools five times and needs images of at least 32×32, got {image_size}"
        )
    layers: list[nn.Module] = []
    channels = in_channels
    for stage in VGG11_STAGES:
        for multiplier in stage:
            layers.append(nn.Conv2d(channels, width * multiplier, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width * multiplier))
            layers.append(nn.ReLU())
            channels = width * multiplier
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, channels),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(channels, num_classes),
    )


class BasicBlock(nn.Module):
    """Two 3×3 conv + BatchNorm layers around an identity or 1×1 projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet with ``width·2^i`` channels in stage i.

    A 3×3 stem, four stages of basic blocks (the second to fourth halve the resolution), global
    average pooling and a linear head.
    """

    def __init__(
        self,
        width: int,
        in_channels: int,
        num_classes: int,
        blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, channels = [], width
        for index, blocks in enumerate(blocks_per_stage):
            out_channels = width * 2**index
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(channels, out_channels, stride)]
            stage += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of images (B, C, H, W)."""
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet(
    width: int,
    in_channels: int,
    image_size: int,
    num_classes: int,
    blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
) -> nn.Module:
    """ResNet-18 for small images (width 64 is the usual CIFAR ResNet-18)."""
    del image_size  # global pooling makes the network independent of the resolution
    return ResNet(width, in_channels, num_classes, tuple(blocks_per_stage))


# Keyword arguments some torchvision builders need to train from scratch on any data: a single
# output (no auxiliary classifiers, whose extra logits the loop would not know what to do with),
# and their own weight initialisation chosen explicitly (torchvision warns otherwise).
TORCHVISION_FIXED_OPTIONS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
# Families whose constructor fixes the image size: the argument that sets it, by name prefix.
TORCHVISION_SIZE_ARGUMENTS = {"vit_": "image_size", "maxvit_": "input_size"}


def torchvision_model(
    width: int,
    in_channels: int,
    image_size: int,
    num_classes: int,
    arch: str = "resnet18",
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """A torchvision classification model, untrained, sized to the data.

    ``num_classes`` sets its head; a ViT or MaxViT is built for ``image_size`` (other models
    take any size their pooling survives); data with other than 3 channels gets a first
    convolution of ``in_channels`` (``adapt_input_channels``). ``width`` is not used: the
    architecture fixes its widths. ``options`` go to torchvision's builder as they are
    (``{"width_mult": 0.5}`` for ``mobilenet_v2``, ``{"dropout": 0.2}``, …).
    """
    from torchvision import models

    del width
    arguments: dict[str, Any] = {**TORCHVISION_FIXED_OPTIONS.get(arch, {}), **(options or {})}
    for prefix, argument in TORCHVISION_SIZE_ARGUMENTS.items():
        if arch.startswith(prefix):
            size = (image_size, image_size) if argument == "input_size" else image_size
            arguments.setdefault(argument, size)
    model = models.get_model(arch, weights=None, num_classes=num_classes, **arguments)
    return adapt_input_channels(model, in_channels, arch)


def adapt_input_channels(model: nn.Module, in_channels: int, name: str) -> nn.Module:
    """Give ``model``'s first RGB convolution ``in_channels`` input channels (in place).

    Chosen over repeating a grayscale channel three times: the network then reads the data as
    it is, costs nothing extra, and its rolled graph has one input vertex per real channel,
    like the built-in models', instead of three copies of one. The new convolution keeps the
    old one's kernel, stride, padding and bias, freshly initialised (nothing is pretrained).
    """
    if in_channels == 3:
        return model
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3 and child.groups == 1:
                setattr(parent, child_name, conv_like(child, in_channels))
                return model
    raise ValueError(f"{name} has no 3-channel convolution to read {in_channels}-channel images")


def conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A new convolution like ``conv`` but reading ``in_channels`` channels."""
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


# Training builds its network from the model config's ``_target_`` (one of the builders above;
# ``mlflow_tg.config.build_from_config``). Scripts and tests that want a network by name use these.
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "lenet": lenet,
    "vgg": vgg,
    "resnet": resnet,
}


def build_model(
    name: str, width: int, in_channels: int, image_size: int, num_classes: int, **options
) -> nn.Module:
    """Build the named network for data of the given shape.

    ``options`` are the model config's other keys; Hydra's own (``_target_``) are ignored.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(BUILDERS)}")
    options = {key: value for key, value in options.items() if not key.startswith("_")}
    return BUILDERS[name](width, in_channels, image_size, num_classes, **options)
