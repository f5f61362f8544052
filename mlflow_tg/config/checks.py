"""Checks on a composed training config, made before any data is loaded or any run is created.

Types and unknown keys are refused by Hydra while it composes (``translate_error`` turns its
error into a one-paragraph ``ConfigError``); ranges by the schemas' ``__post_init__``
(``schema.py``); what depends on this machine or on several groups at once is checked here.
"""

from __future__ import annotations

import importlib.util
import re
import types
from collections.abc import Iterator, Sequence
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import fields, is_dataclass
from enum import Enum
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from mlflow_tg.config.build import build_from_config
from mlflow_tg.config.schema import Config, as_override
from mlflow_tg.errors import ConfigError

# SQLAlchemy driver of a database tracking URI (``dialect+driver://``): module, pip package.
DB_DRIVERS = {
    "psycopg2": ("psycopg2", "psycopg2-binary"),
    "psycopg": ("psycopg", "psycopg[binary]"),
    "mysqldb": ("MySQLdb", "mysqlclient"),
    "pymysql": ("pymysql", "PyMySQL"),
}
DEFAULT_DB_DRIVER = {"postgresql": "psycopg2", "mysql": "mysqldb"}


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad value of a composed config and what is allowed.

    In turn: keys no schema declares (added with ``+key=…``), the range checks of every group
    (the schemas' ``__post_init__``, run by ``OmegaConf.to_object``), the device, the tracking
    store's driver, and whether the model's feature maps survive the data's image size.
    """
    if OmegaConf.get_type(cfg) is not Config:
        raise TypeError("check_config needs the training config composed from conf/config.yaml")
    for key, schema in unknown_keys(cfg):
        raise unknown_key_error(key, f"={OmegaConf.select(cfg, key)!r}", schema)
    try:
        typed: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise (translate_error(error) or ConfigError(first_line(error))) from None
    check_device(typed.device)
    check_tracking_uri(typed.tracking.uri)
    check_model_fits(cfg)


def unknown_keys(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted key, schema) of each key of ``node`` or its groups that the schema lacks."""
    schema = OmegaConf.get_type(node)
    declared = declared_keys(schema, hidden=True)
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
    """Reject a database tracking URI whose SQLAlchemy driver is not installed here."""
    scheme = uri.partition("://")[0].lower() if "://" in uri else ""
    dialect, _, driver = scheme.partition("+")
    shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", uri)  # never print a password
    if dialect == "postgres":
        raise ConfigError(
            f"tracking.uri={shown!r} is not allowed: SQLAlchemy knows PostgreSQL as "
            "postgresql://, and MLflow works with its psycopg2 driver: use "
            "postgresql+psycopg2://user:password@host/db (pip install psycopg2-binary)."
        )
    module, package = DB_DRIVERS.get(driver or DEFAULT_DB_DRIVER.get(dialect, ""), (None, None))
    if module is None or importlib.util.find_spec(module) is not None:
        return
    if dialect == "postgresql":
        remedy = (
            "pip install psycopg2-binary and use postgresql+psycopg2://user:password@host/db "
            "(MLflow's psycopg 3 dialect postgresql+psycopg:// has open bugs)"
        )
    else:
        remedy = f"pip install {package}"
    raise ConfigError(
        f"tracking.uri={shown!r} is not allowed here: its database driver {module} is not "
        f"installed in this environment; {remedy}."
    )


def check_model_fits(cfg: DictConfig) -> None:
    """Build the model on the meta device (no memory) and pass a batch through it.

    Refuses an image size the network's pooling shrinks to nothing. Input channels and classes
    do not change the shapes, so one channel and ten classes stand in for the data's.
    """
    size = cfg.data.image_size
    try:
        with torch.device("meta"):
            model = build_from_config(
                cfg.model, width=cfg.width, in_channels=1, image_size=size, num_classes=10
            )
            model.eval()(torch.empty(2, 1, size, size))
    except (ValueError, RuntimeError) as error:
        raise ConfigError(
            f"data.image_size={size} is not allowed with model={cfg.model.name}: "
            f"{first_line(error)}. Use a larger data.image_size or another model."
        ) from None


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
