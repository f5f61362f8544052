"""Errors that mean bad input: the command stops with one paragraph and exit code 2, no run."""

from __future__ import annotations

import re


class InputError(ValueError):
    """A value, file or model the user gave that cannot work, with what is allowed instead."""


class ConfigError(InputError):
    """A config value that cannot work, with what is allowed instead."""


class RegistryError(LookupError):
    """A registered version that cannot be used as it is, or a registry that cannot be read."""


class Refusal(ValueError):
    """A request the predictor cannot answer: what each refused run lacks."""


def shown_uri(uri: str) -> str:
    """``uri`` as an error may show it: without the password it may carry."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", uri)
