"""The epoch loop: initial evaluation, training epochs, hooks after each, final test."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from mlflow_tg import keys
from mlflow_tg.config import LrSchedule, build_from_config
from mlflow_tg.tracking.run import RunLogger
from mlflow_tg.train.data import ImageData, ImageSplit, batches
from mlflow_tg.train.hooks import Epoch, EpochHook

log = logging.getLogger(__name__)


@dataclass
class EpochResult:
    """Mean loss and accuracy over a split; ``diverged`` when the loss stopped being finite."""

    loss: float
    accuracy: float
    diverged: bool = False


def make_optimizer(cfg: DictConfig, parameters: Any) -> torch.optim.Optimizer:
    """The ``optimizer`` group's ``torch.optim`` class (its ``_target_``) on ``parameters``."""
    return build_from_config(cfg.optimizer)(parameters)


def make_schedule(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> Any:
    """Cosine annealing over the run's epochs, or None for a constant learning rate."""
    if cfg.lr_schedule == LrSchedule.cosine:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return None


def train_one_epoch(
    model: nn.Module,
    data: ImageData,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
    description: str,
) -> EpochResult:
    """One pass over the training split; stops at the first non-finite loss."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    steps = math.ceil(len(data.train) / batch_size)
    stream = batches(data.train, data, batch_size, device, train=True, generator=generator)
    # A live bar only on a terminal; logs and CI get one line per epoch instead.
    for x, y in tqdm(stream, total=steps, desc=description, leave=False, disable=not is_tty()):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            return EpochResult(math.nan, math.nan, diverged=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return EpochResult(total_loss / seen, correct / seen)


@torch.no_grad()
def evaluate(
    model: nn.Module, split: ImageSplit, data: ImageData, batch_size: int, device: torch.device
) -> EpochResult:
    """Mean cross-entropy and accuracy on a split, in eval mode."""
    model.eval()
    total_loss, correct = 0.0, 0
    for x, y in batches(split, data, batch_size, device):
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return EpochResult(total_loss / len(split), correct / len(split))


def is_tty() -> bool:
    """Whether progress output goes to a terminal."""
    return sys.stderr.isatty()


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (model init) and return the generator for batch order."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fit(
    cfg: DictConfig,
    model: nn.Module,
    data: ImageData,
    device: torch.device,
    generator: torch.Generator,
    run: RunLogger,
    hooks: list[EpochHook],
) -> dict[str, Any]:
    """The epoch loop: epoch 0 is the initialisation, then ``cfg.epochs`` training epochs.

    After each epoch's evaluation, every hook sees the epoch in turn; one may end training
    early (it says why), and the run then goes to its test evaluation like a completed one.
    """
    optimizer = make_optimizer(cfg, model.parameters())
    schedule = make_schedule(cfg, optimizer)
    val = evaluate(model, data.val, data, cfg.batch_size, device)
    initial = {keys.VAL_LOSS: val.loss, keys.VAL_ACC: val.accuracy}
    stop = end_epoch(Epoch(0, model, initial, list(run.history)), run, hooks)
    last_epoch, diverged = 0, False
    for epoch in range(1, cfg.epochs + 1):
        if stop:
            log.info("training stops after epoch %d: %s", last_epoch, stop)
            break
        start = time.perf_counter()
        train_result = train_one_epoch(
            model, data, optimizer, cfg.batch_size, device, generator, f"epoch {epoch}"
        )
        if train_result.diverged:
            diverged = True
            run.set_tag(keys.DIVERGED, "true")
            run.set_tag(keys.DIVERGED_EPOCH, epoch)
            log.warning("epoch %d: loss is NaN or infinite; the run stops here", epoch)
            break
        lr = optimizer.param_groups[0]["lr"]
        if schedule is not None:
            schedule.step()
        val = evaluate(model, data.val, data, cfg.batch_size, device)
        metrics = {
            keys.TRAIN_LOSS: train_result.loss,
            keys.TRAIN_ACC: train_result.accuracy,
            keys.VAL_LOSS: val.loss,
            keys.VAL_ACC: val.accuracy,
            keys.EPOCH_TIME: time.perf_counter() - start,
            keys.LEARNING_RATE: lr,
        }
        stop = end_epoch(Epoch(epoch, model, dict(metrics), list(run.history)), run, hooks)
        last_epoch = epoch
        log.info(
            "epoch %d/%d  train_loss %.4f  train_acc %.4f  val_loss %.4f  val_acc %.4f  (%.1f s)",
            *(epoch, cfg.epochs, train_result.loss, train_result.accuracy),
            *(val.loss, val.accuracy, metrics[keys.EPOCH_TIME]),
        )
    test = evaluate(model, data.test, data, cfg.batch_size, device)
    run.log_final({keys.TEST_LOSS: test.loss, keys.TEST_ACC: test.accuracy}, step=last_epoch)
    for hook in hooks:
        hook.on_end(run)
    run.describe(outcome(test.accuracy, last_epoch, cfg.epochs, diverged, stop))
    log.info("test_loss %.4f  test_acc %.4f  (run %s)", test.loss, test.accuracy, run.run_id)
    return {
        keys.TEST_LOSS: test.loss,
        keys.TEST_ACC: test.accuracy,
        "epochs_completed": last_epoch,
        "diverged": diverged,
        "run_id": run.run_id,
    }


def end_epoch(epoch: Epoch, run: RunLogger, hooks: list[EpochHook]) -> str | None:
    """Run the hooks on an evaluated epoch, log its metrics in one call; why to stop, if so."""
    for hook in hooks:
        hook.on_epoch(epoch, run)
    run.log_epoch(epoch.number, epoch.metrics)
    return epoch.stop


def outcome(test_acc: float, epochs: int, planned: int, diverged: bool, stop: str | None) -> str:
    """How the run ended, in one line of its MLflow description."""
    ending = "diverged" if diverged else (f"stopped: {stop}" if stop else "completed")
    return f"test accuracy **{test_acc:.3f}** after {epochs} of {planned} epochs ({ending})"
