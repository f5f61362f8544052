"""Every config option composes and builds what it says; bad values fail early and clearly."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import is_dataclass
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_method
from omegaconf import OmegaConf
from sqlalchemy.engine.url import make_url

from mlflow_tg.config import (
    Centrality,
    ConfigError,
    LrSchedule,
    build_from_config,
    check_config,
    config_id,
    flatten,
)
from mlflow_tg.config.checks import check_tracking_uri
from mlflow_tg.config.schema import DigitsConfig, TorchvisionConfig
from mlflow_tg.graph.centrality import CENTRALITIES
from mlflow_tg.job import train
from mlflow_tg.train.loop import make_optimizer, make_schedule
from mlflow_tg.train.models import BUILDERS
from tests.conftest import CONF_DIR, compose_config

ROOT = CONF_DIR.parent
HAS_PSYCOPG2 = find_spec("psycopg2") is not None
DEFAULT_POSTGRESQL_DRIVER = make_url("postgresql://h/db").get_dialect().driver  # SQLAlchemy's


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_config_builds_a_network_that_runs_on_digits(model: str):
    cfg = compose_config([f"model={model}", "width=4"])
    check_config(cfg)
    assert cfg.model.name == model
    assert get_method(cfg.model._target_) is BUILDERS[model]  # the name labels what is built
    network = build_from_config(cfg.model, width=4, in_channels=1, image_size=32, num_classes=10)
    assert network(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_model_options_reach_the_builder():
    cfg = compose_config(["model=mlp", "width=3", "model.hidden_multipliers=[5]"])
    network = build_from_config(cfg.model, width=3, in_channels=1, image_size=8, num_classes=10)
    assert [layer.out_features for layer in network if isinstance(layer, torch.nn.Linear)] == [
        15,
        10,
    ]
    cfg = compose_config(["model=vgg", "model.batch_norm=true"])
    network = build_from_config(cfg.model, width=2, in_channels=3, image_size=32, num_classes=10)
    assert any(isinstance(layer, torch.nn.BatchNorm2d) for layer in network)


@pytest.mark.parametrize("optimizer", group_options("optimizer"))
def test_every_optimizer_config_builds_its_torch_optimizer(optimizer: str):
    cfg = compose_config([f"optimizer={optimizer}"])
    check_config(cfg)
    built = make_optimizer(cfg, torch.nn.Linear(2, 2).parameters())
    assert type(built).__name__.lower() == cfg.optimizer.name == optimizer
    group = built.param_groups[0]
    assert group["lr"] == cfg.optimizer.lr and group["weight_decay"] == cfg.optimizer.weight_decay
    if optimizer == "sgd":
        assert (group["momentum"], group["nesterov"]) == (0.9, False)
    else:
        assert group["betas"] == (0.9, 0.999)  # a tuple, as torch documents it


def test_sgd_nesterov_and_adam_betas_overrides_reach_torch():
    cfg = compose_config(["optimizer.nesterov=true", "optimizer.momentum=0.5"])
    group = make_optimizer(cfg, torch.nn.Linear(2, 2).parameters()).param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.5
    cfg = compose_config(["optimizer=adam", "optimizer.betas=[0.8,0.99]"])
    group = make_optimizer(cfg, torch.nn.Linear(2, 2).parameters()).param_groups[0]
    assert group["betas"] == (0.8, 0.99)


@pytest.mark.parametrize("data", group_options("data"))
def test_every_data_option_composes_with_its_schema(data: str):
    cfg = compose_config([f"data={data}"])
    check_config(cfg)
    assert cfg.data.name == data
    schema = DigitsConfig if data == "digits" else TorchvisionConfig
    assert OmegaConf.get_type(cfg.data) is schema
    assert 0 < cfg.data.val_fraction < 1 and cfg.data.image_size in (28, 32)


def test_tracking_graph_and_experiment_options_compose_to_what_they_promise():
    server = compose_config(["tracking=server"])
    check_config(server)
    assert server.tracking.uri.startswith("http://") and server.tracking.artifact_root is None
    assert compose_config([]).tracking.uri == "sqlite:///mlflow.db"
    assert group_options("tracking") == ["local", "server"]
    assert compose_config(["graph=off"]).graph.enabled is False
    assert list(compose_config(["graph=full"]).graph.centralities) == list(Centrality)
    assert group_options("graph") == ["default", "full", "off"]
    for experiment in group_options("experiment"):
        cfg = compose_config([f"+experiment={experiment}"])
        check_config(cfg)
    population = compose_config(["+experiment=population"])
    assert population.tracking.experiment == "population" and population.num_threads == 1


def sweep_grid(experiment: str) -> dict[str, list[str]]:
    """The values an experiment's sweep takes per key, what it inherits included."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [f"+experiment={experiment}"], return_hydra_config=True)
    return {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize(
    ("population", "outside"),
    [
        ("population", "offgrid"),
        ("population", "offgrid2"),
        ("population", "offgrid3"),
        ("hard", "hard_offgrid"),
        ("hard", "hard_offgrid2"),
        ("hard", "hard_offgrid3"),
    ],
)
def test_an_out_of_population_sweep_lies_off_its_population_grid(population, outside):
    trained, scored = sweep_grid(population), sweep_grid(outside)
    assert not set(scored["seed"]) & set(trained["seed"])  # seeds never used
    for key in ("width", "optimizer.lr"):
        grid, off = sorted(map(float, trained[key])), sorted(map(float, scored[key]))
        assert not set(off) & set(grid), key  # every value off the grid
        assert off[0] < grid[0] or off[-1] > grid[-1], key  # some outside its range
        assert any(grid[0] < value < grid[-1] for value in off), key  # some between its points
    for key in ("model", "optimizer"):  # the same families: off the grid, not unseen kinds
        assert set(scored.get(key, ["?"])) <= set(trained.get(key, ["?"])), key


@pytest.mark.parametrize(
    ("first", "second"),
    [("hard_offgrid", "hard_offgrid2"), ("hard_offgrid", "hard_offgrid3"),
     ("hard_offgrid2", "hard_offgrid3")],
)  # fmt: skip
def test_the_sweeps_off_the_hard_grid_share_no_value(first, second):
    first, second = sweep_grid(first), sweep_grid(second)
    for key in ("seed", "width", "optimizer.lr", "model.dropout"):
        assert not set(map(float, first[key])) & set(map(float, second[key])), key
    assert not set(map(float, sweep_grid("hard")["model.dropout"])) & set(
        map(float, second["model.dropout"])
    )


def test_the_sweeps_off_the_population_grid_share_no_value():
    first, second = sweep_grid("offgrid"), sweep_grid("offgrid2")
    for key in ("seed", "width", "optimizer.lr"):
        assert not set(map(float, first[key])) & set(map(float, second[key])), key


@pytest.mark.parametrize("earlier", ["offgrid", "offgrid2"])
def test_the_third_sweep_off_the_population_grid_shares_no_seed_or_learning_rate(earlier):
    first, third = sweep_grid(earlier), sweep_grid("offgrid3")
    for key in ("seed", "optimizer.lr", "optimizer.weight_decay"):
        assert not set(map(float, first[key])) & set(map(float, third[key])), key
    # the widths between the grid's 2, 4, 6 and 8 are 3, 5 and 7: the first two sweeps took them
    shared = set(map(float, first["width"])) & set(map(float, third["width"]))
    assert shared <= {5.0}, shared


def test_every_group_option_is_typed_by_a_schema():
    for group in ("model", "data", "optimizer", "tracking", "graph"):
        for option in group_options(group):
            node = compose_config([f"{group}={option}"])[group]
            assert is_dataclass(OmegaConf.get_type(node)), (group, option)


def test_centrality_enum_lists_the_centralities_graph_capture_computes():
    assert [member.value for member in Centrality] == list(CENTRALITIES)


def test_enums_compare_print_and_log_as_their_names():
    cfg = compose_config(["lr_schedule=cosine", "epochs=4"])
    assert cfg.lr_schedule is LrSchedule.cosine and cfg.lr_schedule == "cosine"
    assert f"{cfg.graph.centralities[0]}" == "strength"
    optimizer = make_optimizer(cfg, torch.nn.Linear(2, 2).parameters())
    assert isinstance(make_schedule(cfg, optimizer), torch.optim.lr_scheduler.CosineAnnealingLR)


def test_params_keep_their_names_and_values_without_hydra_keys():
    flat = flatten(compose_config(["model=vgg", "optimizer.lr=0.3"]))
    assert flat["model.name"] == "vgg" and flat["model.batch_norm"] is False
    assert flat["model.dropout"] == 0.0 and flat["data.name"] == "digits"
    assert flat["optimizer.lr"] == 0.3 and flat["optimizer.momentum"] == 0.9
    assert flat["optimizer.weight_decay"] == 0.0005 and flat["lr_schedule"] == "constant"
    assert flat["graph.centralities"] == ["strength", "eigenvector", "pagerank"]
    assert not [key for key in flat if "_target_" in key or "_partial_" in key]


def test_config_id_ignores_the_seed_and_the_store_but_not_the_learning_rate():
    base = compose_config([])
    assert config_id(base) == config_id(compose_config(["seed=3", "tracking.uri=sqlite:///x.db"]))
    assert config_id(base) != config_id(compose_config(["optimizer.lr=0.3"]))


BAD_VALUES = [
    ("width=0", "width=0 is not allowed"),
    ("width=1.5", "width=1.5 is not allowed"),
    ("width=abc", "width='abc' is not allowed"),
    ("epochs=0", "epochs=0 is not allowed"),
    ("seed=abc", "seed='abc' is not allowed: seed must be a whole number"),
    ("num_threads=-1", "num_threads=-1 is not allowed"),
    ("device=tpu", "device='tpu' is not allowed"),
    ("lr_schedule=linear", "lr_schedule='linear' is not allowed: choose one of"),
    ("optimizer.lr=0", "optimizer.lr=0.0 is not allowed"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1 is not allowed"),
    ("optimizer.lr=inf", "optimizer.lr=inf is not allowed"),
    ("optimizer.momentum=-1", "optimizer.momentum=-1.0 is not allowed"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1.0 is not allowed"),
    ("optimizer.nesterov=true optimizer.momentum=0", "optimizer.nesterov=True is not allowed"),
    ("optimizer=adam optimizer.betas=[2,0.9]", "optimizer.betas=[2.0, 0.9] is not allowed"),
    ("data.val_fraction=0", "data.val_fraction=0.0 is not allowed"),
    ("data.test_fraction=1.0", "data.test_fraction=1.0 is not allowed"),
    ("data.image_size=0", "data.image_size=0 is not allowed"),
    ("model=lenet data.image_size=8", "data.image_size=8 is not allowed with model=lenet"),
    ("model=vgg data.image_size=16", "data.image_size=16 is not allowed with model=vgg"),
    ("model.dropout=0.5", "model.dropout=0.5 is not allowed: model has no key 'dropout'"),
    ("model=mlp model.dropout=1.5", "model.dropout=1.5 is not allowed"),
    ("graph.centralities=[strength,degree]", "graph.centralities[1]='degree' is not allowed"),
    ("graph.centralities=[]", "graph.centralities=[] is not allowed"),
    ("graph.pivots=0", "graph.pivots=0 is not allowed"),
    ("tracking.experiment=''", "tracking.experiment='' is not allowed"),
    ("tracking.uri=postgresql://u:p@127.0.0.1/db", "pip install psycopg2-binary"),
    ("foo=1", "foo=1 is not allowed: the top level has no key 'foo'"),
    ("+foo=1", "foo=1 is not allowed: the top level has no key 'foo'"),
    ("+model.depth=3", "model.depth=3 is not allowed: model has no key 'depth'"),
]


@pytest.mark.parametrize(("override", "named"), BAD_VALUES)
def test_bad_values_fail_before_any_run_is_created(
    make_cfg, tmp_path, monkeypatch, override, named
):
    without_postgresql_drivers(monkeypatch)
    never = tmp_path / "never.db"  # not make_cfg's store: that one is a ready copy
    with pytest.raises(ConfigError) as error:
        train(make_cfg(f"tracking.uri=sqlite:///{never}", *override.split()))
    assert named in str(error.value) and "\n" not in str(error.value)
    assert not never.exists()  # the store was never even opened


def without_postgresql_drivers(monkeypatch) -> None:
    """As on a machine where neither of PostgreSQL's drivers is installed."""
    for module in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, module, None)  # an import of it fails


def test_tracking_uri_message_hides_the_password(make_cfg, monkeypatch):
    without_postgresql_drivers(monkeypatch)
    with pytest.raises(ConfigError) as error:
        check_config(make_cfg("tracking.uri=postgresql://user:secret@127.0.0.1/db"))
    assert "postgresql://user:***@127.0.0.1/db" in str(error.value)
    assert "secret" not in str(error.value) and "postgresql+psycopg2://" in str(error.value)


@pytest.mark.skipif(not HAS_PSYCOPG2, reason="psycopg2 is not installed here")
def test_a_postgresql_uri_is_checked_against_the_driver_sqlalchemy_picks(monkeypatch):
    check_tracking_uri("postgresql+psycopg2://u:p@127.0.0.1/db")  # installed: accepted
    monkeypatch.setitem(sys.modules, "psycopg", None)  # psycopg 3 missing, psycopg2 there
    with pytest.raises(ConfigError, match="driver psycopg is not installed"):
        check_tracking_uri("postgresql+psycopg://u:p@127.0.0.1/db")
    if make_url("postgresql://h/db").get_dialect().driver == "psycopg":  # SQLAlchemy >= 2.1
        with pytest.raises(ConfigError, match="use postgresql\\+psycopg2://"):
            check_tracking_uri("postgresql://u:p@127.0.0.1/db")


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns", "/tmp/mlruns"])
def test_the_file_store_is_refused_with_what_to_use_instead(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError) as error:
        check_tracking_uri(uri)
    assert f"tracking.uri={uri!r} is not allowed" in str(error.value)
    assert "sqlite:///PATH/mlflow.db" in str(error.value)
    check_tracking_uri("databricks")  # no scheme, and no path
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in
    check_tracking_uri(uri)


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


CLI_BAD_VALUES = [
    ("width=-3", "width=-3 is not allowed: width must be a whole number ≥ 1"),
    # one in the default tier: each is a fresh train.py process (5-9 s, mostly imports), and
    # test_bad_values_fail_before_any_run_is_created checks every value in-process
    pytest.param(
        "seed=abc", "seed='abc' is not allowed: seed must be a whole number", marks=pytest.mark.slow
    ),
    pytest.param("optimizer.lr=inf", "optimizer.lr=inf is not allowed", marks=pytest.mark.slow),
    pytest.param(
        "model=lenet data.image_size=8",
        "data.image_size=8 is not allowed with model=lenet",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "tracking.uri=postgresql://u:p@127.0.0.1/db",
        "pip install psycopg2-binary and use postgresql+psycopg2://",
        marks=pytest.mark.skipif(
            DEFAULT_POSTGRESQL_DRIVER in sys.modules or find_spec(DEFAULT_POSTGRESQL_DRIVER),
            reason="the driver postgresql:// selects is installed here",
        ),
    ),
]


@pytest.mark.parametrize(("overrides", "named"), CLI_BAD_VALUES)
def test_cli_bad_value_exits_2_with_one_paragraph_and_no_run(tmp_path: Path, overrides, named):
    store = tmp_path / "store"
    result = run_train(tmp_path, f"tracking.uri=sqlite:///{store}/mlflow.db", *overrides.split())
    assert result.returncode == 2, result.stderr[-3000:]
    output = result.stderr + result.stdout
    (line,) = [line for line in output.splitlines() if "is not allowed" in line]
    assert named in line and line.endswith(".")
    assert "Traceback" not in output
    assert not store.exists() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()


def test_cli_unknown_model_lists_the_choices_and_exits_2(tmp_path: Path):
    result = run_train(tmp_path, "model=transformer")
    assert result.returncode == 2
    assert "Could not find 'model/transformer'" in result.stderr
    options = result.stderr.split("Available options in 'model':")[1].split("Config search")[0]
    # the schemas are not options; torchvision and custom come from the ConfigStore
    assert options.split() == ["custom", "lenet", "mlp", "resnet", "torchvision", "vgg"]
