"""One training job, end to end: config → data → model → hooks → tracked epochs → result.

The composition root: the only module that knows every step. Training itself (``train/``)
sees graph capture and live prediction only as hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mlflow_tg.config import check_config, resolve_device
from mlflow_tg.graph.capture import GraphCapture
from mlflow_tg.tracking.run import tracked_run
from mlflow_tg.train.data import load_data
from mlflow_tg.train.hooks import EpochHook
from mlflow_tg.train.loop import fit, seed_everything
from mlflow_tg.train.models import build_model


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job tracked in MLflow; return its final metrics.

    The config is checked before any data is loaded, and the model's graph traced, before any
    run is created: bad input never leaves a run behind.
    """
    check_config(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    data = load_data(cfg.data)
    generator = seed_everything(cfg.seed)
    options = OmegaConf.to_container(cfg.model, resolve=True)
    name = options.pop("name")
    model = build_model(
        name, cfg.width, data.in_channels, data.image_size, data.num_classes, **options
    ).to(device)
    hooks: list[EpochHook] = []
    if cfg.graph.enabled:
        hooks.append(GraphCapture(cfg.graph, model, data.input_shape()))
    with tracked_run(cfg) as run:
        return fit(cfg, model, data, device, generator, run, hooks)
