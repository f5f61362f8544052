"""Objects built from config nodes with a ``_target_``: the network and the optimizer."""

from __future__ import annotations

import functools
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

# Keys of a node that label it rather than configure its target: ``model.name`` and
# ``optimizer.name`` stay in the run's params, but the builders and torch.optim never see them.
LABEL_KEYS = ("name",)


def build_from_config(node: DictConfig, **arguments: Any) -> Any:
    """Hydra's ``instantiate`` of ``node`` with ``arguments``, with two rules of this project.

    ``name`` labels the option and is not passed to the target, and lists are passed as tuples
    (Adam's ``betas``, a ResNet's ``blocks_per_stage``). With ``_partial_: true`` in the node
    the result is a ``functools.partial`` that takes the rest when called (an optimizer's
    parameters); otherwise the built object.

    Example:
        ``build_from_config(cfg.model, width=16, in_channels=1, image_size=32, num_classes=10)``
        and ``build_from_config(cfg.optimizer)(model.parameters())``.
    """
    factory = instantiate(node, _partial_=True, _convert_="all", **arguments)
    options = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in factory.keywords.items()
        if key not in LABEL_KEYS
    }
    built = functools.partial(factory.func, *factory.args, **options)
    return built if node.get("_partial_", False) else built()
