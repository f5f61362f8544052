"""The typed schema of every config group, with the range checks beside the types.

Each ``conf/<group>/<option>.yaml`` starts from one of these dataclasses (its defaults list names
``/schema/<group>/<option>@_here_``), so Hydra refuses a wrong type or an unknown key while it
composes. ``OmegaConf.to_object`` on the composed config builds the dataclasses, whose
``__post_init__`` refuses values of the right type but outside their range, with a one-paragraph
``ConfigError`` in the style ``width=0 is not allowed: … (for example width=16).``

Enum members are strings too (``LrSchedule.cosine == "cosine"``), so code that reads the config
keeps comparing with plain names, and they print and log as their names.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mlflow_tg.errors import ConfigError

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
TORCHVISION_DATASETS = ("mnist", "fashion_mnist", "cifar10", "svhn")


class NamedEnum(str, Enum):
    """An enum whose members are their names as strings: equal to, printed and logged as them."""

    def __str__(self) -> str:
        return self.value


class LrSchedule(NamedEnum):
    """How the learning rate moves over the epochs."""

    constant = "constant"
    cosine = "cosine"  # cosine annealing to 0 over `epochs`


class Centrality(NamedEnum):
    """The vertex centralities graph capture can compute (``mlflow_tg.graph.centrality``)."""

    strength = "strength"
    eigenvector = "eigenvector"
    pagerank = "pagerank"
    katz = "katz"
    hits_authority = "hits_authority"
    betweenness = "betweenness"
    closeness = "closeness"


class Precision(NamedEnum):
    """The float type of the edge weights (``mlflow_tg.graph.build.weight_dtype``)."""

    auto = "auto"  # float64, float32 from 2**24 edges on
    float32 = "float32"
    float64 = "float64"


def is_whole_number(value: Any) -> bool:
    """True for ints, not bools (``True`` is an int in Python, not a width)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """True for finite ints and floats, not bools."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def as_override(value: Any) -> str:
    """``value`` as it is written on the command line: ``[0.9,0.999]``, ``true``, ``0.05``."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(as_override(item) for item in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


class Checked:
    """Range checks for a dataclass schema: ``require`` names the key with its group."""

    GROUP: ClassVar[str] = ""  # the config group the schema types; "" for the top level

    def key(self, name: str) -> str:
        """The dotted key of field ``name``, e.g. ``optimizer.lr``."""
        return f"{self.GROUP}.{name}" if self.GROUP else name

    def require(self, ok: bool, name: str, rule: str, example: bool = True) -> None:
        """Unless ``ok``, raise ``key=value is not allowed: rule (for example key=default).``."""
        if ok:
            return
        key, hint = self.key(name), ""
        spec = next(f for f in fields(self) if f.name == name)
        if spec.default_factory is not NO_DEFAULT:
            hint = f" (for example {key}={as_override(spec.default_factory())})"
        elif spec.default not in (NO_DEFAULT, MISSING):
            hint = f" (for example {key}={as_override(spec.default)})"
        value = getattr(self, name)
        raise ConfigError(f"{key}={value!r} is not allowed: {rule}{hint if example else ''}.")

    def require_whole(self, name: str, minimum: int) -> None:
        """The field is a whole number ≥ ``minimum``."""
        value = getattr(self, name)
        rule = f"{self.key(name)} must be a whole number ≥ {minimum}"
        self.require(is_whole_number(value) and value >= minimum, name, rule)

    def require_fraction(self, name: str) -> None:
        """The field lies strictly between 0 and 1."""
        value = getattr(self, name)
        ok = is_finite_number(value) and 0 < value < 1
        self.require(ok, name, f"{self.key(name)} must lie strictly between 0 and 1")

    def require_unit_interval(self, name: str) -> None:
        """The field is a number in [0, 1)."""
        value = getattr(self, name)
        ok = is_finite_number(value) and 0 <= value < 1
        self.require(ok, name, f"{self.key(name)} must be a number ≥ 0 and < 1")


# ---------------------------------------------------------------------------------------------
# model: the builders of mlflow_tg/train/models.py; width and the data's shape come at build time


@dataclass
class ModelConfig(Checked):
    """A network: ``_target_`` builds it, ``name`` labels the run (the ``model.name`` param)."""

    GROUP: ClassVar[str] = "model"
    _target_: str = MISSING
    name: str = MISSING


@dataclass
class MlpConfig(ModelConfig):
    """Fully connected: hidden layers of ``width * m`` neurons for each m."""

    _target_: str = "mlflow_tg.train.models.mlp"
    name: str = "mlp"
    hidden_multipliers: list[int] = field(default_factory=lambda: [8, 4])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        multipliers = self.hidden_multipliers
        ok = all(is_whole_number(m) and m >= 1 for m in multipliers)
        self.require(ok, "hidden_multipliers", "each multiplier must be a whole number ≥ 1")
        self.require_unit_interval("dropout")


@dataclass
class LenetConfig(ModelConfig):
    """LeNet-5 sized by ``width``."""

    _target_: str = "mlflow_tg.train.models.lenet"
    name: str = "lenet"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.require_unit_interval("dropout")


@dataclass
class VggConfig(ModelConfig):
    """VGG-11 with channels ``width·(1, 2, 4, 4, 8, 8, 8, 8)``."""

    _target_: str = "mlflow_tg.train.models.vgg"
    name: str = "vgg"
    batch_norm: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.require_unit_interval("dropout")


@dataclass
class ResnetConfig(ModelConfig):
    """CIFAR-style ResNet: basic blocks per stage."""

    _target_: str = "mlflow_tg.train.models.resnet"
    name: str = "resnet"
    blocks_per_stage: list[int] = field(default_factory=lambda: [2, 2, 2, 2])

    def __post_init__(self) -> None:
        blocks = self.blocks_per_stage
        ok = len(blocks) > 0 and all(is_whole_number(b) and b >= 1 for b in blocks)
        rule = "it must list one or more stages, each of a whole number ≥ 1 of blocks"
        self.require(ok, "blocks_per_stage", rule)


def torchvision_archs() -> list[str]:
    """The names of torchvision's classification models (``resnet18``, ``vit_b_16``, …)."""
    from torchvision import models  # torchvision is slow to import: only when a config names it

    return sorted(models.list_models(module=models))


@dataclass
class TorchvisionModelConfig(ModelConfig):
    """A torchvision classification model by its builder's name, sized to the data.

    ``width`` is not used (the architecture fixes its widths); ``options`` go to torchvision's
    builder (``+model.options.width_mult=0.5``). The run is named after ``arch``.
    """

    _target_: str = "mlflow_tg.train.models.torchvision_model"
    name: str = "${.arch}"
    arch: str = "resnet18"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        archs = torchvision_archs()
        rule = (
            f"model=torchvision builds one of torchvision's {len(archs)} classification "
            f"models, untrained: {', '.join(archs)}"
        )
        self.require(self.arch in archs, "arch", rule)


@dataclass
class CustomModelConfig(ModelConfig):
    """Any importable ``nn.Module`` class or function that builds one, by its dotted path.

    It is called with ``width``, ``in_channels``, ``image_size`` and ``num_classes`` (the data's
    shape) and with every other key of the node (``+model.some_arg=3``): the only model schema
    that takes keys it does not declare.
    """

    OPEN: ClassVar[bool] = True  # keys beyond the declared ones are the target's arguments
    _target_: str = MISSING
    name: str = "${mlflow_tg.short_name:${._target_}}"


# ---------------------------------------------------------------------------------------------
# optimizer: torch.optim classes, built as partials that take the parameters at call time


@dataclass
class OptimizerConfig(Checked):
    """A torch optimizer: ``_target_`` is its class; ``name`` labels the run."""

    GROUP: ClassVar[str] = "optimizer"
    _target_: str = MISSING
    _partial_: bool = True  # the model's parameters are passed when it is built
    name: str = MISSING
    lr: float = 1.0e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        lr_ok = is_finite_number(self.lr) and self.lr > 0
        self.require(lr_ok, "lr", "the learning rate must be a finite number > 0")
        decay_ok = is_finite_number(self.weight_decay) and self.weight_decay >= 0
        self.require(decay_ok, "weight_decay", "the weight decay must be a finite number ≥ 0")


@dataclass
class SgdConfig(OptimizerConfig):
    """SGD with (Nesterov) momentum."""

    _target_: str = "torch.optim.SGD"
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5.0e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_unit_interval("momentum")
        rule = "Nesterov momentum needs optimizer.momentum > 0 (or optimizer.nesterov=false)"
        self.require(not self.nesterov or self.momentum > 0, "nesterov", rule, example=False)


@dataclass
class AdamConfig(OptimizerConfig):
    """Adam; ``betas`` are the decay rates of the first and second moment estimates."""

    _target_: str = "torch.optim.Adam"
    name: str = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = len(self.betas) == 2 and all(is_finite_number(b) and 0 <= b < 1 for b in self.betas)
        self.require(ok, "betas", "Adam's betas must be two numbers, each ≥ 0 and < 1")


@dataclass
class AdamWConfig(AdamConfig):
    """AdamW: Adam with decoupled weight decay."""

    _target_: str = "torch.optim.AdamW"
    name: str = "adamw"
    weight_decay: float = 1.0e-2


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class DataConfig(Checked):
    """An image data set, resized to ``image_size`` and split with ``split_seed``."""

    GROUP: ClassVar[str] = "data"
    name: str = MISSING
    image_size: int = 32
    val_fraction: float = 0.1
    split_seed: int = 0
    augment: bool = False

    def __post_init__(self) -> None:
        self.require_whole("image_size", 1)
        self.require_fraction("val_fraction")


@dataclass
class DigitsConfig(DataConfig):
    """scikit-learn's shipped 8×8 digits, split train/val/test."""

    name: str = "digits"
    val_fraction: float = 0.2
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        self.require(self.name == "digits", "name", "this data option reads digits only")
        super().__post_init__()
        self.require_fraction("test_fraction")
        rule = (
            f"with data.val_fraction={self.val_fraction!r} no image is left to train on: "
            "data.val_fraction + data.test_fraction must be < 1"
        )
        self.require(self.val_fraction + self.test_fraction < 1, "test_fraction", rule)


@dataclass
class TorchvisionConfig(DataConfig):
    """A data set torchvision reads from its own files under ``root``."""

    name: str = MISSING
    root: str = "data"
    download: bool = False
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        rule = f"choose one of {list(TORCHVISION_DATASETS)} (or data=digits)"
        self.require(self.name in TORCHVISION_DATASETS, "name", rule, example=False)
        super().__post_init__()


# ---------------------------------------------------------------------------------------------
# tracking and graph capture


@dataclass
class TrackingConfig(Checked):
    """Where the run is recorded: an MLflow tracking URI and experiment."""

    GROUP: ClassVar[str] = "tracking"
    uri: str = "sqlite:///mlflow.db"
    artifact_root: str | None = None  # used when the experiment is created in a local store
    experiment: str = "mlflow_tg"
    heartbeat_s: float = 60.0  # how often a running run renews its mlflow_tg.heartbeat tag
    drain_timeout_s: float = 600.0  # how long a run's end waits for an absent server

    def __post_init__(self) -> None:
        rule = "the tracking URI must not be empty"
        self.require(bool(self.uri.strip()), "uri", rule)
        rule = "the MLflow experiment needs a name"
        self.require(bool(self.experiment.strip()), "experiment", rule)
        for name in ("heartbeat_s", "drain_timeout_s"):
            value = getattr(self, name)
            rule = f"{self.key(name)} must be a finite number of seconds above 0"
            self.require(is_finite_number(value) and value > 0, name, rule)


@dataclass
class GraphConfig(Checked):
    """Graph capture: which centralities, how often, and their sampling."""

    GROUP: ClassVar[str] = "graph"
    enabled: bool = True
    every_n_epochs: int = 1
    centralities: list[Centrality] = field(
        default_factory=lambda: [Centrality.strength, Centrality.eigenvector, Centrality.pagerank]
    )
    pivots: int = 64
    sources: int = 64
    seed: int = 0
    fold_batchnorm: bool = True
    save_graph: bool = False
    node_tables: bool = True
    threads: int = 2
    precision: Precision = Precision.auto

    def __post_init__(self) -> None:
        for name, minimum in (("every_n_epochs", 1), ("pivots", 1), ("sources", 1)):
            self.require_whole(name, minimum)
        self.require_whole("seed", 0)
        self.require_whole("threads", 0)
        chosen = [str(c) for c in self.centralities]
        ok = not self.enabled or (0 < len(chosen) == len(set(chosen)))
        rule = (
            f"choose one or more of {[c.value for c in Centrality]}, each once "
            "(or graph.enabled=false to capture nothing)"
        )
        self.require(ok, "centralities", rule, example=False)


class PrunePolicy(NamedEnum):
    """Which pruning policy stops jobs of a sweep (``mlflow_tg.prune.policies``)."""

    off = "off"
    predicted = "predicted"
    median = "median"


@dataclass
class PredictConfig(Checked):
    """Live prediction: the registered model asked after each epoch, here or at an endpoint."""

    GROUP: ClassVar[str] = "predict"
    enabled: bool = False
    model: str = "tg-performance-predictor"
    alias: str = "champion"
    endpoint: str | None = None  # e.g. http://127.0.0.1:5001; None: load the model here

    def __post_init__(self) -> None:
        self.require(bool(self.model.strip()), "model", "name a registered model")
        self.require(bool(self.alias.strip()), "alias", "name an alias of that model")
        ok = self.endpoint is None or self.endpoint.startswith(("http://", "https://"))
        self.require(ok, "endpoint", "give an http(s):// URL or null", example=False)


@dataclass
class PruneConfig(Checked):
    """Pruning of a sweep's jobs by a policy on their sweep-mates."""

    GROUP: ClassVar[str] = "prune"
    policy: PrunePolicy = PrunePolicy.off
    quantile: float = 0.75
    quantile_before_training: float | None = 0.5  # None: quantile, at epoch 0 too
    warmup: int = 5
    min_epoch: int = 1
    sweep: str | None = None  # the mates' sweep tag; None: this job's Hydra multirun

    def __post_init__(self) -> None:
        self.require_unit_interval("quantile")
        if self.quantile_before_training is not None:
            self.require_unit_interval("quantile_before_training")
        self.require_whole("warmup", 0)
        self.require_whole("min_epoch", 1)


# ---------------------------------------------------------------------------------------------
# the top level


@dataclass
class Config(Checked):
    """One training run: its config groups and the top-level knobs."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    tracking: TrackingConfig = MISSING
    graph: GraphConfig = MISSING
    predict: PredictConfig = MISSING
    prune: PruneConfig = MISSING
    width: int = 16
    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    batch_size: int = 128
    lr_schedule: LrSchedule = LrSchedule.constant
    num_threads: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "epochs", "batch_size"):
            self.require_whole(name, 1)
        self.require_whole("num_threads", 0)  # 0 keeps torch's default
        rule = "use auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps"
        ok = DEVICE_PATTERN.fullmatch(self.device) is not None
        self.require(ok, "device", rule, example=False)
        if self.prune.policy == PrunePolicy.predicted and not self.predict.enabled:
            raise ConfigError(
                "prune=predicted is not allowed with predict=off: pruning on predictions needs "
                "live prediction, so add predict=champion (or predict=endpoint), or prune with "
                "prune=median, which needs no predictor."
            )


SCHEMAS: dict[str, dict[str, type]] = {  # ConfigStore group → option → schema
    "schema": {
        "config": Config,
        "tracking": TrackingConfig,
        "graph": GraphConfig,
        "predict": PredictConfig,
        "prune": PruneConfig,
    },
    "schema/model": {
        "mlp": MlpConfig,
        "lenet": LenetConfig,
        "vgg": VggConfig,
        "resnet": ResnetConfig,
    },
    "schema/optimizer": {"sgd": SgdConfig, "adam": AdamConfig, "adamw": AdamWConfig},
    "schema/data": {"digits": DigitsConfig, "torchvision": TorchvisionConfig},
}


# Model options that are their schema alone, with no YAML file in conf/model/: ``model=torchvision``
# and ``model=custom`` build networks that ``width`` does not size, unlike the built-in builders
# every conf/model/*.yaml names.
MODEL_OPTIONS: dict[str, type] = {
    "torchvision": TorchvisionModelConfig,
    "custom": CustomModelConfig,
}


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore, where the YAML files' defaults find them."""
    store = ConfigStore.instance()
    for group, options in SCHEMAS.items():
        for name, schema in options.items():
            store.store(group=group, name=name, node=schema)
    for name, schema in MODEL_OPTIONS.items():
        store.store(group="model", name=name, node=schema)
