"""Checks on a composed training config, made before any data is loaded or any run is created.

Types and unknown keys are refused by Hydra while it composes (``translate_error`` turns its
error into a one-paragraph ``ConfigError``); ranges by the schemas' ``__post_init__``
(``schema.py``); what depends on this machine or on several groups at once is checked here.
"""

from __future__ import annotations

import importlib
import inspect
import os
import types
from collections.abc import Iterator, Sequence
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import fields, is_dataclass
from enum import Enum
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)
from sqlalchemy.engine.url import make_url
from torch import nn

from mlflow_tg.config.build import LABEL_KEYS, build_from_config
from mlflow_tg.config.schema import MODEL_OPTIONS, Config, as_override
from mlflow_tg.errors import ConfigError, shown_uri

# The pip package of a database driver module that SQLAlchemy imports for a tracking URI.
DB_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]",
               "MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "pyodbc": "pyodbc"}  # fmt: skip
DATABASE_DIALECTS = ("postgresql", "mysql", "mssql")  # MLflow's database stores besides SQLite
NO_SCHEME_STORES = ("databricks", "databricks-uc", "uc")  # URIs without :// that are no path
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"  # MLflow's opt-in to its file store
# What every model builder is called with besides its own keys: the width knob and the data's shape.
MODEL_SIZE_ARGUMENTS = ("width", "in_channels", "image_size", "num_classes")


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad value of a composed config and what is allowed.

    In turn: keys no schema declares (added with ``+key=…``), the range checks of every group
    (the schemas' ``__post_init__``, run by ``OmegaConf.to_object``), the device, the tracking
    store's driver, and whether the model's feature maps survive the data's image size.
    """
    if OmegaConf.get_type(cfg) is not Config:
        raise TypeError("check_config needs the training config composed from conf/config.yaml")
    check_builtin_target(cfg.model)
    for key, schema in unknown_keys(cfg):
        raise unknown_key_error(key, f"={OmegaConf.select(cfg, key)!r}", schema)
    try:
        typed: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise (translate_error(error) or ConfigError(first_line(error))) from None
    check_device(typed.device)
    check_tracking_uri(typed.tracking.uri)
    if is_open(OmegaConf.get_type(cfg.model)):
        check_custom_target(cfg.model)
    check_model_fits(cfg)


def unknown_keys(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted key, schema) of each key of ``node`` or its groups that the schema lacks."""
    schema = OmegaConf.get_type(node)
    declared = None if is_open(schema) else declared_keys(schema, hidden=True)
    for key, child in node.items_ex(resolve=False):
        if declared is not None and key not in declared:
            yield f"{prefix}{key}", schema
        elif OmegaConf.is_dict(child):
            yield from unknown_keys(child, f"{prefix}{key}.")


def unknown_key_error(key: str, given: str, schema: Any) -> ConfigError:
    """``key=value is not allowed: <group> has no key …; its keys are [...]``."""
    parent, _, name = key.rpartition(".")
    return ConfigError(
        f"{key}{given} is not allowed: {parent or 'the top level'} has no key {name!r}; its "
        f"keys are {declared_keys(schema)}."
    )


def declared_keys(schema: Any, hidden: bool = False) -> list[str] | None:
    """The fields of a dataclass schema (without ``_target_``-like ones unless ``hidden``)."""
    if not is_dataclass(schema):
        return None
    return [f.name for f in fields(schema) if hidden or not f.name.startswith("_")]


def check_device(device: str) -> None:
    """Reject a device this machine does not have (the schema has checked its spelling)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} was asked for but this machine has no CUDA device: use "
            "device=auto or device=cpu."
        )
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r} does not exist: this machine has CUDA devices "
            f"0..{torch.cuda.device_count() - 1}."
        )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' was asked for but MPS is not available: use device=auto.")


def check_tracking_uri(uri: str) -> None:
    """Reject a tracking URI this environment cannot use: the file store, a missing driver."""
    scheme = uri.partition("://")[0].lower() if "://" in uri else ""
    dialect = scheme.partition("+")[0]
    shown = shown_uri(uri)
    if dialect == "postgres":
        raise ConfigError(
            f"tracking.uri={shown!r} is not allowed: SQLAlchemy knows PostgreSQL as "
            "postgresql://, and MLflow works with its psycopg2 driver: use "
            "postgresql+psycopg2://user:password@host/db (pip install psycopg2-binary)."
        )
    if names_file_store(uri) and os.environ.get(ALLOW_FILE_STORE, "").lower() != "true":
        raise ConfigError(
            f"tracking.uri={shown!r} is not allowed: it names MLflow's file store (./mlruns), "
            f"which MLflow 3 refuses unless {ALLOW_FILE_STORE}=true; use a SQLite file, "
            "sqlite:///PATH/mlflow.db, or a tracking server, http://host:port (make "
            "server-start)."
        )
    if dialect in DATABASE_DIALECTS:
        check_database_driver(uri, shown, dialect)


def names_file_store(uri: str) -> bool:
    """Whether MLflow reads ``uri`` as its file store: ``file://``, or a path without scheme."""
    scheme = uri.partition("://")[0].lower() if "://" in uri else ""
    return scheme == "file" or (not scheme and bool(uri) and uri not in NO_SCHEME_STORES)


def check_database_driver(uri: str, shown: str, dialect: str) -> None:
    """Reject a database URI whose SQLAlchemy driver (named, or the dialect's default) is missing.

    SQLAlchemy decides the default: ``postgresql://`` means psycopg 3 from SQLAlchemy 2.1 on,
    psycopg2 before, so it is asked rather than assumed.
    """
    try:
        make_url(uri).get_dialect().import_dbapi()
        return
    except ImportError as error:
        module = error.name or str(error)
    except Exception:  # a URI SQLAlchemy cannot parse: MLflow's own error says why
        return
    if dialect == "postgresql":
        remedy = (
            "pip install psycopg2-binary and use postgresql+psycopg2://user:password@host/db "
            "(MLflow's psycopg 3 dialect, which postgresql:// selects in SQLAlchemy 2.1, has "
            "open bugs)"
        )
    else:
        remedy = f"pip install {DB_PACKAGES.get(module, module)}"
    raise ConfigError(
        f"tracking.uri={shown!r} is not allowed here: its database driver {module} is not "
        f"installed in this environment; {remedy}."
    )


def is_open(schema: Any) -> bool:
    """Whether a schema takes keys it does not declare (``model=custom``: the target's own)."""
    return bool(getattr(schema, "OPEN", False))


def check_builtin_target(model: DictConfig) -> None:
    """Refuse a built-in model option whose ``_target_`` was replaced on the command line.

    Its other keys (``blocks_per_stage``…) would go to the new target; ``model=custom`` is the
    option for a network of one's own.
    """
    schema = OmegaConf.get_type(model)
    default = next((f.default for f in fields(schema) if f.name == "_target_"), NO_DEFAULT)
    target = model.get("_target_")
    if is_open(schema) or default in (NO_DEFAULT, MISSING, None) or target == default:
        return
    keys = [key for key in declared_keys(schema) or [] if key != "name"]
    raise ConfigError(
        f"model._target_={target} is not allowed with model={model.get('name')}: that option "
        f"builds {default} and would pass it its own keys ({', '.join(keys) or 'none'}). For "
        f"a network of your own use model=custom model._target_={target} (with +model.KEY=… "
        "for its arguments)."
    )


def check_custom_target(model: DictConfig) -> None:
    """``model._target_`` of ``model=custom`` imports and accepts the arguments it will get."""
    path = model._target_
    try:
        target = locate(path)
    except Exception as error:  # any failure to import the user's module is bad input here
        raise ConfigError(
            f"model._target_={path} is not allowed: it cannot be imported "
            f"({type(error).__name__}: {first_line(error)}). Give the dotted path of an "
            "nn.Module class, or of a function that returns one, that train.py's Python can "
            "import: installed, or on PYTHONPATH (model._target_=my_package.MyNet)."
        ) from None
    given = [*MODEL_SIZE_ARGUMENTS, *(key for key in model if not is_builder_key(key))]
    missing = unaccepted(target, given)
    if missing:
        raise ConfigError(
            f"model._target_={path} is not allowed: it does not take {', '.join(missing)}. "
            f"model=custom calls it with {', '.join(MODEL_SIZE_ARGUMENTS)} (the data's shape; "
            "it may ignore them) and with each +model.KEY=… as KEY: add those parameters (or "
            "**kwargs), or point model._target_ at a function that builds your network."
        )


def locate(path: str) -> Any:
    """The object a dotted path names: the longest importable module, then its attributes.

    Like Hydra's own lookup, without the error Hydra logs before raising.
    """
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            found = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is None or not module_name.startswith(error.name):
                raise  # a module that exists failed to import one of its own
            continue
        for attribute in parts[split:]:
            if not hasattr(found, attribute):
                raise AttributeError(f"{module_name} has no {'.'.join(parts[split:])!r}")
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(f"no module named {parts[0]!r}")


def is_builder_key(key: Any) -> bool:
    """Keys of a model node that are not passed to its target (``_target_``, ``name``)."""
    return str(key).startswith("_") or key in LABEL_KEYS


def unaccepted(target: Any, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that ``target`` cannot take as keyword arguments."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the build will tell
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return []
    keywords = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return [name for name in names if name not in keywords]


def check_model_fits(cfg: DictConfig) -> None:
    """Build the model on the meta device (no memory) and pass a batch through it.

    Refuses an image size the network's pooling shrinks to nothing. Input channels and classes
    do not change the shapes, so one channel and ten classes stand in for the data's. A
    network that cannot be built or run on the meta device (it reads a value: torchvision's
    RegNets size their stages with ``.tolist()``) is built and run on the CPU instead.
    """
    try:
        try:
            model = fitted_model(cfg, torch.device("meta"))
        except (RuntimeError, NotImplementedError) as error:
            generic = OmegaConf.get_type(cfg.model) in MODEL_OPTIONS.values()
            if not generic or "meta" not in str(error):
                raise
            model = fitted_model(cfg, torch.device("cpu"))
    except (ValueError, RuntimeError, AssertionError, TypeError, NotImplementedError) as error:
        raise model_error(cfg, error) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model._target_={cfg.model._target_} is not allowed: it returned a "
            f"{type(model).__name__}, not a torch.nn.Module."
        )


def fitted_model(cfg: DictConfig, device: torch.device) -> Any:
    """The model built for one-channel images of the data's size, after a batch of two.

    TypeError unless the batch gives logits of shape (2, classes): the loop's loss needs them.
    """
    size = cfg.data.image_size
    with torch.device(device):
        model = build_from_config(
            cfg.model, width=cfg.width, in_channels=1, image_size=size, num_classes=10
        )
        if not isinstance(model, nn.Module):
            return model
        logits = model.eval()(torch.empty(2, 1, size, size))
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if shape != (2, 10):
        raise TypeError(f"a batch of 2 gave {shape} where logits of shape (2, 10) were due")
    return model


def model_error(cfg: DictConfig, error: BaseException) -> ConfigError:
    """The paragraph for a model that cannot be built for, or run on, the data."""
    size, why = cfg.data.image_size, f"{type(error).__name__}: {first_line(error).rstrip('!')}"
    schema = OmegaConf.get_type(cfg.model)
    if is_open(schema):
        return ConfigError(
            f"model._target_={cfg.model._target_} is not allowed: built with width="
            f"{cfg.width}, in_channels=1, image_size={size}, num_classes=10 and its "
            f"+model keys, and run on a batch of shape (2, 1, {size}, {size}), it fails "
            f"({why}). A network of your own must take the data's shape this way and "
            "return (batch, num_classes) logits."
        )
    if isinstance(error, TypeError) and "options" in cfg.model:
        return ConfigError(
            f"model.options={as_override(dict(cfg.model.options))} is not allowed with "
            f"model.arch={cfg.model.arch}: torchvision's builder refuses them ({why})."
        )
    if "arch" in cfg.model:
        return ConfigError(
            f"data.image_size={size} is not allowed with model.arch={cfg.model.arch}: "
            f"{why}. Use a larger data.image_size (torchvision's models are made for 224) or "
            "another model.arch."
        )
    return ConfigError(
        f"data.image_size={size} is not allowed with model={cfg.model.name}: "
        f"{first_line(error)}. Use a larger data.image_size or another model."
    )


def translate_error(error: Exception, overrides: Sequence[str] = ()) -> ConfigError | None:
    """The one-paragraph ConfigError for a value Hydra or OmegaConf refused, else None.

    ``error`` is Hydra's composition error (its cause says which key) or OmegaConf's own;
    ``overrides`` are the command line's, where the value of an unknown key is found. An
    unknown option of a config group gives None: Hydra's own message lists the options.
    """
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    if not isinstance(cause, OmegaConfBaseException) or not cause.full_key:
        return None
    key = cause.full_key
    if isinstance(cause, ConfigAttributeError | ConfigKeyError):
        given = next((f"={value}" for name, value in parsed(overrides) if name == key), "")
        return unknown_key_error(key, given, cause.object_type)
    if isinstance(cause, ValidationError):
        return ConfigError(f"{key}={cause.value!r} is not allowed: {expected(cause)}.")
    if isinstance(cause, MissingMandatoryValue):
        return ConfigError(f"{key} is not set: give it a value ({key}=…).")
    return ConfigError(f"{key} is not allowed: {first_line(cause)}.")


def parsed(overrides: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(key, value) of each ``key=value`` override, without its ``+``/``++``/``~`` prefix."""
    for override in overrides:
        name, sep, value = override.lstrip("+~").partition("=")
        if sep:
            yield name, value


def expected(cause: ValidationError) -> str:
    """What the schema allows for the key a ValidationError names, with an example."""
    owner, name = cause.object_type, cause.key
    if is_dataclass(owner) and isinstance(name, str):
        hint = get_type_hints(owner).get(name)
        default = next((f.default for f in fields(owner) if f.name == name), NO_DEFAULT)
    elif get_origin(cause.ref_type) is list:  # an item of a typed list
        hint, default = get_args(cause.ref_type)[0], NO_DEFAULT
    else:
        return first_line(cause)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return f"choose one of {[member.value for member in hint]}"
    example = "" if default in (NO_DEFAULT, None) else f" (for example {cause.full_key}="
    example += f"{as_override(default)})" if example else ""
    return f"{cause.full_key} must be {describe(hint)}{example}"


def describe(hint: Any) -> str:
    """A type of the schema in words: ``int`` → "a whole number"."""
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if hint in words:
        return words[hint]
    if isinstance(hint, type) and issubclass(hint, Enum):
        return f"one of {[member.value for member in hint]}"
    if get_origin(hint) is list:
        return f"a list, each item {describe(get_args(hint)[0])}"
    if get_origin(hint) in (Union, types.UnionType):
        kinds = [describe(arg) for arg in get_args(hint) if arg is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in get_args(hint) else "")
    return str(hint)


def first_line(error: BaseException) -> str:
    """The first line of an error's message, without a final full stop."""
    message = getattr(error, "msg", None) or str(error)
    return message.strip().splitlines()[0].rstrip(".")
