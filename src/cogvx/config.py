"""One schema per stage: a dataclass whose fields are both the TOML keys and the CLI flags.

Precedence is CLI > file > dataclass defaults. The CLI passes only the flags the user gave
(everything else is None), so a file value is never overwritten by a flag's default.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TypeVar

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
            raise ValueError(f"--config {file} does not exist.")
        try:
            data = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"--config {file} is not valid TOML: {err}") from err
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{file}: unknown setting(s) {', '.join(unknown)}. Known: {', '.join(sorted(names))}.")
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
