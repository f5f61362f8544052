"""One training job, end to end: config → data → model → hooks → tracked epochs → result.

The composition root: the only module that knows every step. Training itself (``train/``)
sees graph capture and live prediction only as hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from mlflow_tg.config import build_from_config, check_config, resolve_device
from mlflow_tg.graph.capture import GraphCapture
from mlflow_tg.predictor.live import LivePrediction
from mlflow_tg.prune.hook import SweepPruner
from mlflow_tg.prune.policies import make_policy
from mlflow_tg.tracking.run import run_params, tracked_run
from mlflow_tg.train.data import load_data
from mlflow_tg.train.hooks import EpochHook
from mlflow_tg.train.loop import fit, seed_everything


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
    model = build_from_config(  # the model config's _target_, sized by width and the data
        cfg.model,
        width=cfg.width,
        in_channels=data.in_channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
    ).to(device)
    hooks = make_hooks(cfg, model, data.input_shape())
    with tracked_run(cfg) as run:
        result = fit(cfg, model, data, device, generator, run, hooks)
    if run.left_in_spool is not None:  # the server was away at the end: see train.py's exit
        result["left_in_spool"] = str(run.left_in_spool)
    return result


def make_hooks(cfg: DictConfig, model: nn.Module, input_shape: tuple[int, ...]) -> list[EpochHook]:
    """What watches the epochs, in order: graph capture, live prediction, then pruning.

    The graph is traced here, before any run exists, so a network it cannot represent stops
    the job with nothing logged. Pruning reads the epoch's prediction: it comes last.
    """
    hooks: list[EpochHook] = []
    if cfg.graph.enabled:
        hooks.append(GraphCapture(cfg.graph, model, input_shape))
    if cfg.predict.enabled:
        hooks.append(LivePrediction(cfg.predict, run_params(cfg)))
    if cfg.prune.policy != "off":
        median = cfg.prune.policy == "median"  # compares curves epoch by epoch
        hooks.append(SweepPruner(make_policy(cfg.prune), median, cfg.prune.sweep))
    return hooks
