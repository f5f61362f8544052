"""Width-parametrised networks: mlp, lenet, vgg (VGG-11-like) and a CIFAR-style ResNet-18.

Every builder takes the data's shape (channels, image size, classes) and a ``width`` knob, so the
same config trains on 8×8 digits resized to 32 or on CIFAR-10, and a sweep over ``width`` scales
the whole network. Each ``conf/model/*.yaml`` names its builder as ``_target_``. A builder refuses
an image size its pooling would shrink to nothing (ValueError); the config check builds the model
on the meta device to find that out before any data is loaded.
"""

from __future__ import annotations

from collections.abc import Callable

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
