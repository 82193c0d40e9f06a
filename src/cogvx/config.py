"""One schema per stage: a dataclass whose fields are both the TOML keys and the CLI flags.

Precedence is CLI > file > dataclass defaults. The CLI passes only the flags the user gave
(everything else is None), so a file value is never overwritten by a flag's default.

Each field is declared once with ``setting``: its default, its help text, its flag (``Option``) and, for a
number, its ``Domain``: the values it may take, finite and bounded, so a setting outside it is refused where it
is read (a file line by ``build``, naming the file; a flag or a hand-built config by ``check_domains`` in
``__post_init__``), never at step 9000. ``stage`` gathers the domains into the class's ``DOMAINS`` table; the
CLI (``cogvx.cligen``) is generated from the same metadata.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass
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
        domains = _domains(cls)
        for key, value in data.items():
            if not _fits(value, hints[key]):
                raise ConfigError(
                    f"{file}: {key} = {_toml_value_or_repr(value)} is not {_describe(hints[key])}; fix that line."
                )
            if key in domains and not domains[key].holds(value):
                raise ConfigError(
                    f"{file}: {key} = {_toml_value_or_repr(value)} is out of range: it must be "
                    f"{domains[key].describe()}{domains[key].reason()}; fix that line."
                )
        values.update(data)
    values.update({k: v for k, v in flags.items() if v is not None})
    return cls(**values)


@dataclass(frozen=True)
class Domain:
    """The values a numeric setting may take: finite, from ``low`` to ``high`` (an end excluded where open).

    ``flag``: the setting's CLI spelling where it is not ``--field-name``; ``file_only``: it has no flag, only a
    line in the --config file. ``meaning`` leads the description ("a probability"); ``why`` says why the
    bound is where it is, where that is not plain. A tuple field's domain holds for each of its items.
    """

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    meaning: str = ""
    why: str = ""
    flag: str | None = None
    file_only: bool = False

    def holds(self, value: Any) -> bool:
        """Whether ``value`` (a number, or a tuple of them for a tuple field) is in the domain."""
        if isinstance(value, (tuple, list)):
            return all(self.holds(v) for v in value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """The domain in words: "from 1 to 4096", "positive and at most 10", "a probability, from 0 to 1"."""
        low, high = _number(self.low), _number(self.high)
        if self.low_open or self.high_open:
            start = ("positive" if self.low == 0 else f"above {low}") if self.low_open else f"at least {low}"
            text = f"{start} and " + (f"below {high}" if self.high_open else f"at most {high}")
        else:
            text = f"from {low} to {high}"
        return f"{self.meaning}, {text}" if self.meaning else text

    def reason(self) -> str:
        return f": {self.why}" if self.why else ""


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line (``cogvx.cligen`` reads it).

    ``help``: the text, to which ``[default: ...]`` is added from the field's default, or ``rule`` (what an unset
    field means) where the default is None. ``name``: the CLI parameter where it is not the field's (a repeatable
    ``--resolution`` fills ``resolutions``). ``decls``: the flag spellings where they are not ``--field-name``
    (``--x/--no-x`` booleans, ``--compile`` for ``compile_vae``). ``argument``: positional; ``metavar`` its name.
    ``file_only``: no flag, a line in the --config file only. ``choices``: the values a string may take.
    ``comma_list``: a tuple field given as one comma-separated text, not a repeatable flag.
    """

    help: str = ""
    rule: str | None = None
    name: str | None = None
    decls: tuple[str, ...] = ()
    argument: bool = False
    metavar: str | None = None
    file_only: bool = False
    choices: tuple[str, ...] = ()
    comma_list: bool = False

    def flag(self, field_name: str) -> str:
        """The flag a message names: ``--max-steps``, ``--compile`` (for ``compile_vae``)."""
        if self.decls:
            return self.decls[0].split("/")[0]
        return "--" + (self.name or field_name).replace("_", "-")


OPTION = "cogvx"  # the field metadata key holding a field's Option
DOMAIN = "cogvx.domain"  # ... and its Domain


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    domain: Domain | None = None,
    factory: Any = dataclasses.MISSING,
    **option: Any,
) -> Any:
    """A config field declared once: default, help text, flag spelling (``Option``'s fields) and domain."""
    opt = Option(help=help, **option)
    if domain is not None:
        custom = opt.flag("x") if (opt.decls or opt.name) else None
        domain = dataclasses.replace(domain, flag=domain.flag or custom, file_only=domain.file_only or opt.file_only)
    meta = {OPTION: opt, DOMAIN: domain}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_of(field: dataclasses.Field) -> Option:
    """A field's ``Option`` (a plain field is a flag of its own name, without help)."""
    return field.metadata.get(OPTION) or Option()


def stage(cls: type[T]) -> type[T]:
    """Decorator: ``cls`` as a dataclass whose ``DOMAINS`` table gathers its fields' domains (and any it declares)."""
    cls = dataclass(cls)
    declared = {f.name: f.metadata[DOMAIN] for f in dataclasses.fields(cls) if f.metadata.get(DOMAIN)}
    cls.DOMAINS = {**declared, **vars(cls).get("DOMAINS", {})}
    return cls


def check_choices(config: Any) -> None:
    """Refuse a field whose ``Option`` lists choices and whose value is not one of them, naming the flag."""
    for field in dataclasses.fields(config):
        opt, value = option_of(field), getattr(config, field.name)
        if opt.choices and value is not None and value not in opt.choices:
            where = f"{field.name} (in the --config file)" if opt.file_only else opt.flag(field.name)
            raise ConfigError(f"{where} must be one of {', '.join(opt.choices)} (got {value!r}).")


def integers(low: int, high: int, **kw: Any) -> Domain:
    """Whole numbers from ``low`` to ``high``, both included."""
    return Domain(low, high, integer=True, **kw)


def numbers(low: float, high: float, **kw: Any) -> Domain:
    """Finite numbers from ``low`` to ``high`` (``low_open``/``high_open`` exclude an end)."""
    return Domain(low, high, **kw)


def positive(high: float, **kw: Any) -> Domain:
    """Finite numbers above 0, at most ``high``."""
    return Domain(0, high, low_open=True, **kw)


PROBABILITY = Domain(0, 1, meaning="a probability")
MAX_STEPS = 10**9  # a bound on every step count: at a step per millisecond, eleven days
SEED = integers(0, 2**63 - 1, why="a seed is a 64-bit integer for torch")
VIDEO_FPS = integers(1, 240)  # the frame rate written into the mp4 files of cogvx sample and render
SHEET_WIDTH = integers(1, 1024, file_only=True)  # frames per video in their contact sheets


def check_domains(config: Any) -> None:
    """Refuse a numeric field of ``config`` outside its domain, in one line naming its flag (or its key).

    Stage configs call this first in ``__post_init__``: a flag's value is checked here, a file's by ``build``
    already (naming the file). A numeric field without a declared domain is a bug, not a user error.
    """
    domains = _domains(type(config))
    for name in numeric_fields(type(config)):
        if name not in domains:
            raise TypeError(f"{type(config).__name__}.{name} is numeric and has no Domain in DOMAINS")
        value, domain = getattr(config, name), domains[name]
        if value is None or domain.holds(value):
            continue
        if domain.file_only:
            raise ConfigError(
                f"{name} must be {domain.describe()} (got {_shown(value)}){domain.reason()}; set it in the --config "
                "file."
            )
        flag = domain.flag or "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} must be {domain.describe()} (got {_shown(value)}){domain.reason()}.")


def numeric_fields(cls: type) -> list[str]:
    """The fields of ``cls`` that hold numbers (ints or floats, alone, optional, or in a tuple; not bools)."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if _is_numeric(hints[f.name])]


def _is_numeric(hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType, tuple):
        return any(_is_numeric(arg) for arg in args if arg is not Ellipsis)
    return hint in (int, float)


def _domains(cls: type) -> dict[str, Domain]:
    return getattr(cls, "DOMAINS", {})


def _number(value: float) -> str:
    """A bound as people write it: 4096, 0.5, 10^9, 2^63-1."""
    if value == 2**63 - 1:
        return "2^63-1"
    if value >= 10**6 and value == int(value) and str(int(value)).rstrip("0") == "1":
        return f"10^{len(str(int(value))) - 1}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, float) else f"{value:g}"
    return text if len(text) <= 40 else text[:37] + "..."


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
