"""The user's own code named on the command line as `package.module:object`."""

from __future__ import annotations

import importlib
import os
import sys

from .errors import ConfigError


def is_reference(name: str) -> bool:
    """Whether `name` looks like `package.module:object` rather than a built-in's name."""
    module_name, _, attribute = name.partition(":")
    return bool(module_name and attribute)


def load_object(name: str, what: str):
    """The object `package.module:object` (dotted attributes allowed), imported from the current
    folder (as `python -m` would) or the installed packages; ConfigError in one line otherwise."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{what} {name!r} must look like package.module:object")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"cannot import {what} {name!r}: {type(e).__name__}: {e}") from None
    found: object = module
    for part in attribute.split("."):
        found = getattr(found, part, None)
    if found is None:
        raise ConfigError(f"{what} {name!r}: {module_name} has no {attribute!r}")
    return found


def load_instance(name: str, what: str, cls: type):
    """The `cls` instance `package.module:object` names, or that a function of no arguments
    there returns (built on demand: a user's factory)."""
    found = load_object(name, what)
    if callable(found) and not isinstance(found, cls):
        try:
            found = found()
        except Exception as e:
            raise ConfigError(f"{what} {name!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(found, cls):
        raise ConfigError(f"{what} {name!r} is a {type(found).__name__}, not a fedforge.{cls.__name__}")
    return found
