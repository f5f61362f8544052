"""The training job: config → data → model → epochs (with graph capture) → MLflow run."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from mlflow_tg.capture import GraphCapture, NoCapture, make_capture
from mlflow_tg.config import check_config, resolve_device
from mlflow_tg.data import ImageData, ImageSplit, batches, load_data
from mlflow_tg.models import build_model
from mlflow_tg.tracking import RunLogger, tracked_run

log = logging.getLogger(__name__)


@dataclass
class EpochResult:
    """Mean loss and accuracy over a split; ``diverged`` when the loss stopped being finite."""

    loss: float
    accuracy: float
    diverged: bool = False


def make_optimizer(cfg: DictConfig, parameters: Any) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW from the ``optimizer`` config group."""
    opt = cfg.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=opt.lr,
            momentum=opt.momentum,
            nesterov=opt.nesterov,
            weight_decay=opt.weight_decay,
        )
    if opt.name in ("adam", "adamw"):
        cls = torch.optim.Adam if opt.name == "adam" else torch.optim.AdamW
        return cls(parameters, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
    raise ValueError(f"unknown optimizer {opt.name!r}; choose sgd, adam or adamw")


def make_schedule(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> Any:
    """Cosine annealing over the run's epochs, or None for a constant learning rate."""
    if cfg.lr_schedule == "cosine":
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
    capture = make_capture(cfg.graph, model, data.input_shape())
    with tracked_run(cfg) as run:
        return fit(cfg, model, data, device, generator, run, capture)


def fit(
    cfg: DictConfig,
    model: nn.Module,
    data: ImageData,
    device: torch.device,
    generator: torch.Generator,
    run: RunLogger,
    capture: GraphCapture | NoCapture,
) -> dict[str, Any]:
    """The epoch loop: epoch 0 is the initialisation, then ``cfg.epochs`` training epochs."""
    optimizer = make_optimizer(cfg, model.parameters())
    schedule = make_schedule(cfg, optimizer)
    val = evaluate(model, data.val, data, cfg.batch_size, device)
    initial = {"val_loss": val.loss, "val_acc": val.accuracy}
    run.log_epoch(0, initial | capture.maybe(0, model, run))
    last_epoch, diverged = 0, False
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        train_result = train_one_epoch(
            model, data, optimizer, cfg.batch_size, device, generator, f"epoch {epoch}"
        )
        if train_result.diverged:
            diverged = True
            run.set_tag("diverged", "true")
            run.set_tag("mlflow_tg.diverged_epoch", epoch)
            log.warning("epoch %d: loss is NaN or infinite; the run stops here", epoch)
            break
        lr = optimizer.param_groups[0]["lr"]
        if schedule is not None:
            schedule.step()
        val = evaluate(model, data.val, data, cfg.batch_size, device)
        metrics = {
            "train_loss": train_result.loss,
            "train_acc": train_result.accuracy,
            "val_loss": val.loss,
            "val_acc": val.accuracy,
            "epoch_time_s": time.perf_counter() - start,
            "lr": lr,
        }
        run.log_epoch(epoch, metrics | capture.maybe(epoch, model, run))
        last_epoch = epoch
        log.info(
            "epoch %d/%d  train_loss %.4f  train_acc %.4f  val_loss %.4f  val_acc %.4f  (%.1f s)",
            *(epoch, cfg.epochs, train_result.loss, train_result.accuracy),
            *(val.loss, val.accuracy, metrics["epoch_time_s"]),
        )
    test = evaluate(model, data.test, data, cfg.batch_size, device)
    run.log_final({"test_loss": test.loss, "test_acc": test.accuracy}, step=last_epoch)
    capture.finish(run)
    log.info("test_loss %.4f  test_acc %.4f  (run %s)", test.loss, test.accuracy, run.run_id)
    return {
        "test_loss": test.loss,
        "test_acc": test.accuracy,
        "epochs_completed": last_epoch,
        "diverged": diverged,
        "run_id": run.run_id,
    }
