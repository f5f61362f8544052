"""Errors that mean bad input: the command stops with one paragraph and exit code 2, no run."""

from __future__ import annotations


class InputError(ValueError):
    """A value, file or model the user gave that cannot work, with what is allowed instead."""


class ConfigError(InputError):
    """A config value that cannot work, with what is allowed instead."""
