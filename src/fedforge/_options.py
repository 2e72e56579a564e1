"""Settings as frozen dataclasses whose fields are both TOML keys and command-line flags.

A group of settings (data, client, strategy, privacy, ... ; the deployment server's and
client's) is a frozen dataclass of `option(...)` fields that checks its own values in its
`__post_init__`. From the same fields come the TOML keys (`local_epochs = 2`, flat or in the
group's table `[client]`) and the flags (`--local-epochs 2`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ConfigError


def option(
    default: Any,
    help: str,
    choices: Iterable[str] | None = None,
    *,
    open_choices: bool = False,
    metavar: str | None = None,
    const: str | None = None,
) -> Any:
    """A setting: its default, its help line, and the values it takes (`choices`; checked by
    `check_choices` unless `open_choices`: then its group also takes e.g. package.module:object).
    With `const`, its flag may be given without a value, which is then `const`."""
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "open": open_choices,
        "metavar": metavar,
        "const": const,
    }
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(settings: Any, group: type) -> None:
    """A ConfigError for the first field of `group` in `settings` outside its closed choices."""
    for f in dataclasses.fields(group):
        choices, value = f.metadata["choices"], getattr(settings, f.name)
        if choices and not f.metadata["open"] and value is not None and value not in choices:
            raise ConfigError(f"unknown {f.name} {value!r} (choose from: {', '.join(choices)})")


def of_group(settings: Any, group: type) -> Any:
    """The `group` instance holding the values `settings` has for its fields."""
    return group(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(group)})


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """ "; did you mean 'x'?" for the known name closest to `key` (also one that ends in `_key`,
    as proximal_mu for mu), or "" when none is close."""
    close = closest(key, known)
    return f"; did you mean {close!r}?" if close else ""


def closest(key: str, known: Iterable[str]) -> str | None:
    """The known name closest to `key` (or one that ends in `_key`, as proximal_mu for mu), if any."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    close = close or [k for k in known if k.endswith("_" + key) or k.startswith(key + "_")][:1]
    return close[0] if close else None


def field_types(*groups: type) -> dict[str, Any]:
    """Each setting's annotated type in `groups` (used to check TOML values and build flags)."""
    return {name: tp for group in groups for name, tp in typing.get_type_hints(group).items() if name in _names(group)}


def _names(group: type) -> set[str]:
    return {f.name for f in dataclasses.fields(group)}


def checked(values: Mapping[str, Any], types_: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`values` with unknown keys and wrongly typed values refused, ints widened for float keys."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(f"{source}: unknown key {key!r}{did_you_mean(key, types_)}")
        tp = types_[key]
        if typing.get_origin(tp) is tuple:  # a list of strings in TOML, a repeated flag
            if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{source}: {key} must be a list of strings, got {value!r}")
            out[key] = tuple(value)
            continue
        accepted = _accepted(tp)
        if (isinstance(value, bool) and bool not in accepted) or not isinstance(value, accepted):
            names = " or ".join(sorted({t.__name__ for t in accepted}))
            raise ConfigError(f"{source}: {key} must be {names}, got {value!r}")
        out[key] = float(typing.cast(float, value)) if tp is float else value
    return out


def flatten(
    document: Mapping[str, Any], tables: Mapping[str, type], source: str, aliases: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The settings of a TOML document as flat keys: a key at the top, or in the table of its
    group (`[strategy]` `proximal_mu = 0.5`); `aliases` rename keys in tables (strategy's `name`).
    A key in a table that is not that group's is refused, naming the close one."""
    aliases = aliases or {}
    out: dict[str, Any] = {}
    for key, value in document.items():
        if not isinstance(value, dict):
            if key in out:
                raise ConfigError(f"{source}: {key} is given twice (at the top and in a table)")
            out[key] = value
            continue
        if key not in tables:
            hint = did_you_mean(key, tables)
            raise ConfigError(f"{source}: unknown table [{key}]{hint} (tables: {', '.join(tables)})")
        names = _names(tables[key])
        for inner, inner_value in value.items():
            name = aliases.get(f"{key}.{inner}", inner)
            if name not in names:
                raise ConfigError(f"{source}: unknown key {inner!r} in [{key}]{did_you_mean(inner, names)}")
            if name in out:
                raise ConfigError(f"{source}: {name} is given twice (at the top and in [{key}])")
            out[name] = inner_value
    return out


def _accepted(tp) -> tuple[type, ...]:
    """The Python types a value may have for a field annotated `tp`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(t for arg in typing.get_args(tp) for t in _accepted(arg))
    if tp is float:
        return (float, int)
    if tp is type(None):
        return ()
    return (tp,)
