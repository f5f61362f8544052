"""Models by config: torchvision's classifiers by name, and any nn.Module by its ``_target_``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mlflow_tg.config import ConfigError, build_from_config, check_config
from mlflow_tg.config.schema import torchvision_archs
from mlflow_tg.job import train
from mlflow_tg.train.models import torchvision_model
from tests.conftest import CONF_DIR, all_runs, compose_config

ROOT = CONF_DIR.parent


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """A network of one's own, as ``model=custom`` calls it."""

    def __init__(
        self, width: int, in_channels: int, image_size: int, num_classes: int, depth: int = 1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class FixedSize(nn.Module):
    """A network that does not take the data's shape."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(64, num_classes)


def not_a_network(width, in_channels, image_size, num_classes):
    return {"width": width}


def wrong_logits(width, in_channels, image_size, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, 3))


def convs(network: nn.Module) -> list[nn.Conv2d]:
    return [module for module in network.modules() if isinstance(module, nn.Conv2d)]


def test_a_torchvision_model_is_sized_to_the_data_and_named_after_its_arch():
    cfg = compose_config(["model=torchvision", "model.arch=resnet18"])
    check_config(cfg)
    assert cfg.model.name == "resnet18"
    gray = build_from_config(cfg.model, width=16, in_channels=1, image_size=32, num_classes=7)
    assert gray.conv1.in_channels == 1 and gray.conv1.out_channels == 64
    assert gray.conv1.kernel_size == (7, 7) and gray.conv1.stride == (2, 2)
    assert gray(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
    color = build_from_config(cfg.model, width=16, in_channels=3, image_size=32, num_classes=10)
    assert color.conv1.in_channels == 3 and color.fc.out_features == 10


def test_vits_are_built_for_the_data_image_size():
    network = torchvision_model(16, 1, 32, 10, arch="vit_b_16")
    assert network.image_size == 32 and network.conv_proj.in_channels == 1
    cfg = compose_config(["model=torchvision", "model.arch=vit_b_16", "data.image_size=40"])
    with pytest.raises(ConfigError, match=r"data.image_size=40 .* model.arch=vit_b_16: .*patch"):
        check_config(cfg)


@pytest.mark.slow
def test_every_torchvision_classifier_builds_for_grayscale_images_on_the_meta_device():
    for arch in torchvision_archs():
        # RegNets size their stages with .tolist(), which the meta device cannot answer
        device = "cpu" if arch.startswith("regnet") else "meta"
        with torch.device(device), torch.no_grad():
            network = torchvision_model(4, 1, 224, 10, arch=arch)
            assert network.eval()(torch.zeros(1, 1, 224, 224)).shape == (1, 10), arch
        assert convs(network)[0].in_channels == 1, arch


def test_a_bad_arch_is_refused_listing_every_classifier():
    cfg = compose_config(["model=torchvision", "model.arch=resnet19"])
    with pytest.raises(ConfigError) as refused:
        check_config(cfg)
    message = str(refused.value)
    assert message.startswith("model.arch='resnet19' is not allowed")
    assert all(arch in message for arch in torchvision_archs()) and "\n" not in message


def test_a_bad_arch_exits_2_from_train_py_before_any_run(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "model=torchvision", "model.arch=resnet19"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr  # Hydra's log goes to stdout
    assert result.returncode == 2, output[-2000:]
    assert "model.arch='resnet19' is not allowed" in output
    assert "resnet18" in output and "Traceback" not in output
    assert not (tmp_path / "mlflow.db").exists()  # no store touched, so no run


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.arch=inception_v3"], r"data.image_size=32 is not allowed with model.arch=incep"),
        (["model.arch=alexnet", "data.image_size=16"], r"data.image_size=16 .* model.arch=alex"),
        (["+model.options.bogus=1"], r"model.options=\{'bogus': 1\} is not allowed .* 'bogus'"),
    ],
)
def test_what_a_torchvision_model_cannot_take_is_refused(overrides, message):
    cfg = compose_config(["model=torchvision", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_torchvision_options_reach_its_builder():
    cfg = compose_config(["model=torchvision", "model.arch=mobilenet_v2"])
    check_config(cfg)
    full = build_from_config(cfg.model, width=1, in_channels=1, image_size=32, num_classes=10)
    cfg = compose_config(
        ["model=torchvision", "model.arch=mobilenet_v2", "+model.options.width_mult=0.5"]
    )
    check_config(cfg)
    half = build_from_config(cfg.model, width=1, in_channels=1, image_size=32, num_classes=10)
    assert convs(half)[0].out_channels * 2 == convs(full)[0].out_channels == 32


def test_auxiliary_classifiers_are_left_out_so_training_sees_one_output():
    for arch in ("googlenet", "inception_v3"):
        network = torchvision_model(16, 3, 96, 10, arch=arch).train()
        assert isinstance(network(torch.zeros(2, 3, 96, 96)), torch.Tensor), arch


def test_a_torchvision_model_trains_with_graph_capture(make_cfg, client):
    result = train(make_cfg("model=torchvision", "model.arch=resnet18", "data.image_size=16"))
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "resnet18-w2-s0"
    assert run.data.params["model.arch"] == "resnet18"
    assert run.data.metrics["tg.graph/vertices"] > 1000
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "tg.strength/gini")]
    assert sorted(steps) == [0, 1]


def test_a_module_of_ones_own_gets_the_datas_shape_and_its_own_keys(make_cfg, client):
    target = f"model._target_={__name__}.TinyNet"
    cfg = make_cfg("model=custom", target, "+model.depth=3")
    check_config(cfg)
    assert cfg.model.name == "TinyNet"
    network = build_from_config(cfg.model, width=4, in_channels=1, image_size=8, num_classes=10)
    assert len(convs(network)) == 3 and network.head.out_features == 10
    result = train(cfg)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "TinyNet-w2-s0"
    assert run.data.params["model.depth"] == "3" and run.data.params["model.name"] == "TinyNet"
    assert "tg.eigenvector/gini" in run.data.metrics


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], r"model._target_ is not set"),
        (["model._target_=tests.no_such_module.Net"], r"cannot be imported .*no_such_module"),
        ([f"model._target_={__name__}.Nope"], r"cannot be imported .* has no 'Nope'"),
        ([f"model._target_={__name__}.FixedSize"], r"does not take width, in_channels, image"),
        ([f"model._target_={__name__}.TinyNet", "+model.dept=3"], r"does not take dept\."),
        ([f"model._target_={__name__}.not_a_network"], r"returned a dict, not a torch.nn.Mod"),
        ([f"model._target_={__name__}.wrong_logits"], r"gave \(2, 3\) where logits of shape"),
    ],
)
def test_a_module_of_ones_own_that_cannot_work_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_config(["model=custom", *overrides]))


def test_a_built_in_option_with_another_target_points_to_model_custom():
    cfg = compose_config([f"model._target_={__name__}.TinyNet"])
    with pytest.raises(ConfigError, match=r"model=resnet: .*blocks_per_stage.*use model=custom"):
        check_config(cfg)


def test_refused_models_leave_no_run(make_cfg, client):
    for overrides in (["model.arch=resnet19"], ["model.arch=inception_v3"]):
        with pytest.raises(ConfigError):
            train(make_cfg("model=torchvision", *overrides))
    assert all_runs(client) == []
