"""Typer commands generated from a stage's config dataclass: one spelling per option.

Each field declared with ``cogvx.config.setting`` becomes one parameter: its flag (``--field-name``, or the
``Option``'s spellings), its type (a tuple field is a repeatable flag), its help with ``[default: ...]`` read
from the dataclass default. The command builds the config with ``config.build(cls, file, **given)``, passing
only the flags the user gave, so precedence is CLI > file > defaults. Importing this module loads no stage.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from cogvx import config as configfile
from cogvx.config import option_of

T = TypeVar("T")
CONFIG_HELP = "TOML file with any of these settings (flags win)."


def shown(value: Any) -> str:
    """A dataclass default as the help text shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def default_of(field: dataclasses.Field) -> Any:
    """A field's default (its factory's value), or MISSING."""
    if field.default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def help_text(config: type, name: str, text: str | None = None, rule: str | None = None) -> str:
    """The help of ``config``'s field ``name`` (``text``/``rule``: its Option's unless given) with its default;
    ``rule`` says what an unset (None) field means and is refused for a field that has a default."""
    field = {f.name: f for f in dataclasses.fields(config)}[name]
    opt = option_of(field)
    text, rule = opt.help if text is None else text, opt.rule if rule is None else rule
    default = default_of(field)
    if default is None or default is dataclasses.MISSING or default in ("", ()):
        return f"{text} [default: {rule}]" if rule else text
    if rule is not None:
        raise TypeError(f"{config.__name__}.{name} has a default ({default!r}); a rule is only for unset fields")
    return f"{text} [default: {_shown_for(opt.decls, default)}]"


def _shown_for(decls: tuple[str, ...], default: Any) -> str:
    """A boolean with its own two spellings (``--deep/--quick``) shows the one in effect; others as ``shown``."""
    if isinstance(default, bool) and decls and "/" in decls[0]:
        on, off = (d.strip().removeprefix("--") for d in decls[0].split("/"))
        if off != f"no-{on}":
            return on if default else off
    return shown(default)


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that the command line sets (all but the file-only ones)."""
    return [f for f in dataclasses.fields(cls) if not option_of(f).file_only]


def cli_name(field: dataclasses.Field) -> str:
    """The command's parameter for ``field``: the Option's name, else the field's."""
    return option_of(field).name or field.name


def _cli_type(hint: Any) -> Any:
    """The type Typer parses a field as: None dropped, a path-or-URL as text, a tuple as a repeatable list."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        return str if set(kept) == {Path, str} else _cli_type(kept[0]) if len(kept) == 1 else str
    if origin is tuple:
        return list[_cli_type(args[0])]
    return hint


def _parameter(field: dataclasses.Field, hint: Any, config: type) -> inspect.Parameter:
    opt = option_of(field)
    required = default_of(field) is dataclasses.MISSING
    help = help_text(config, field.name)
    if opt.argument:
        info = typer.Argument(... if required else None, help=help, metavar=opt.metavar)
    else:
        info = typer.Option(... if required else None, *opt.decls, help=help, metavar=opt.metavar)
    return inspect.Parameter(
        cli_name(field),
        inspect.Parameter.KEYWORD_ONLY,
        default=info,
        annotation=str if opt.comma_list else _cli_type(hint),
    )


def command(
    app: typer.Typer, config: type[T], *, name: str | None = None, config_file: bool = True
) -> Callable[[Callable[[Callable[[], T]], None]], Callable[[Callable[[], T]], None]]:
    """Decorator: register ``action(build)`` as the command ``name`` whose flags are ``config``'s fields.

    ``action`` gets ``build``, which makes the config from the flags given (and the ``--config`` file); it
    calls it where a bad setting should be reported (inside the command's error guard). Its docstring is the
    command's help.
    """
    hints = typing.get_type_hints(config)
    fields = flag_fields(config)
    params = [_parameter(f, hints[f.name], config) for f in fields]
    params.sort(key=lambda p: not isinstance(p.default, typer.models.ArgumentInfo))  # arguments first
    if config_file:
        info = typer.Option(None, help=CONFIG_HELP)
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=info, annotation=Path))
    field_for = {cli_name(f): f.name for f in fields}

    def register(action: Callable[[Callable[[], T]], None]) -> Callable[[Callable[[], T]], None]:
        def run_command(**given: Any) -> None:
            file = given.pop("config", None)
            flags = {field_for[key]: _given(value) for key, value in given.items()}
            action(lambda: configfile.build(config, file, **flags))

        run_command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run_command.__annotations__ = {p.name: p.annotation for p in params}
        run_command.__doc__ = action.__doc__
        run_command.__name__ = action.__name__
        run_command.config = config  # type: ignore[attr-defined]  # which config the command's flags fill
        run_command.field_for = field_for  # type: ignore[attr-defined]
        app.command(name or action.__name__.replace("_", "-"))(run_command)
        return action

    return register


def _given(value: Any) -> Any:
    """A repeatable flag arrives as a list (empty when not given); the config field is a tuple."""
    if isinstance(value, (list, tuple)):
        return tuple(value) or None
    return value
