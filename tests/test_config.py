"""Config groups compose, every model builds, and bad values fail early and clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mlflow_tg.config import ConfigError, check_config, config_id
from mlflow_tg.job import train
from mlflow_tg.train.loop import make_optimizer
from mlflow_tg.train.models import build_model
from tests.conftest import CONF_DIR, all_runs, compose_config

ROOT = CONF_DIR.parent


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_config_builds_a_network_for_digits(model: str):
    cfg = compose_config([f"model={model}", "width=4"])
    options = OmegaConf.to_container(cfg.model)
    network = build_model(options.pop("name"), cfg.width, 1, 32, 10, **options)
    assert network(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("optimizer", group_options("optimizer"))
def test_every_optimizer_config_builds(optimizer: str):
    cfg = compose_config([f"optimizer={optimizer}"])
    built = make_optimizer(cfg, torch.nn.Linear(2, 2).parameters())
    assert built.param_groups[0]["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("group", ["data", "tracking", "graph", "experiment"])
def test_every_other_group_option_composes(group: str):
    for option in group_options(group):
        prefix = "+" if group == "experiment" else ""
        assert compose_config([f"{prefix}{group}={option}"]) is not None


def test_config_id_ignores_the_seed_and_the_store_but_not_the_learning_rate():
    base = compose_config([])
    assert config_id(base) == config_id(compose_config(["seed=3", "tracking.uri=sqlite:///x.db"]))
    assert config_id(base) != config_id(compose_config(["optimizer.lr=0.3"]))


BAD_VALUES = [
    ("width=0", "width=0"),
    ("width=1.5", "width=1.5"),
    ("width=abc", "width='abc'"),
    ("epochs=0", "epochs=0"),
    ("optimizer.lr=0", "optimizer.lr=0"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1"),
    ("device=tpu", "device='tpu'"),
    ("lr_schedule=linear", "lr_schedule='linear'"),
]


@pytest.mark.parametrize(("override", "named"), BAD_VALUES)
def test_bad_values_fail_before_any_run_is_created(make_cfg, client, override, named):
    with pytest.raises(ConfigError) as error:
        train(make_cfg(override))
    assert named in str(error.value) and "\n" not in str(error.value)
    assert all_runs(client) == []


def test_cuda_asked_for_on_a_machine_without_it_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        check_config(compose_config(["device=cuda"]))


def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py …`` in ``tmp_path``, as a user would run it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_bad_value_exits_non_zero_with_one_paragraph(tmp_path: Path):
    result = run_train(tmp_path, "width=-3")
    assert result.returncode != 0
    assert (
        "width=-3 is not allowed: width must be a whole number ≥ 1" in result.stderr + result.stdout
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_unknown_model_lists_the_choices(tmp_path: Path):
    result = run_train(tmp_path, "model=transformer")
    assert result.returncode != 0
    assert "Could not find 'model/transformer'" in result.stderr
    for choice in ("lenet", "mlp", "resnet", "vgg"):
        assert choice in result.stderr
