"""One schema per stage: a dataclass whose fields are both the TOML keys and the CLI flags.

Precedence is CLI > file > dataclass defaults. The CLI passes only the flags the user gave
(everything else is None), so a file value is never overwritten by a flag's default.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from cogvx.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def build(cls: type[T], file: Path | None = None, **flags: Any) -> T:
    """An instance of the config dataclass ``cls`` from defaults, an optional TOML file and CLI flags."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if file is not None:
        file = Path(file)
        if not file.is_file():
            raise ConfigError(f"--config {file} does not exist.")
        try:
            data = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"--config {file} is not valid TOML: {err}") from err
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{file}: unknown setting(s) {', '.join(unknown)}. Known: {', '.join(sorted(names))}.")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if not _fits(value, hints[key]):
                raise ConfigError(
                    f"{file}: {key} = {_toml_value_or_repr(value)} is not {_describe(hints[key])}; fix that line."
                )
        values.update(data)
    values.update({k: v for k, v in flags.items() if v is not None})
    return cls(**values)


def as_dict(config: Any) -> dict[str, Any]:
    """Plain JSON/TOML-friendly values (paths as strings, tuples as lists, None dropped)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def to_toml(config: Any) -> str:
    """A TOML file that ``build`` reads back into the same config."""
    lines = []
    for key, value in as_dict(config).items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"Cannot write {value!r} to TOML")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a TOML value can stand for a field annotated ``hint`` (ints pass for floats, strings for paths)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is tuple:  # a list, or for a list of strings also one comma-separated string
        return (isinstance(value, list) and all(_fits(v, args[0]) for v in value)) or (
            args[0] is str and isinstance(value, str)
        )
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    return True  # a type TOML cannot express: the dataclass checks it


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        plural = {str: "strings", int: "integers", float: "numbers", Path: "path strings"}
        return f"a list of {plural.get(args[0], _describe(args[0]))}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _toml_value_or_repr(value: Any) -> str:
    try:
        return _toml_value(value)
    except TypeError:
        return repr(value)
