"""Command-line options generated from the fields of a config dataclass (``sparta run``'s
every :class:`~sparta.config.RunConfig` field, and the grid's list keys).

Each field made with :func:`sparta.config.checks.rule` becomes ``--field-name`` with the
field's type and range (checked by the config's own :func:`~sparta.config.checks.check_value`,
so the CLI and the library accept the same values), its ``help`` metadata and its default in
the help text; a boolean becomes ``--x/--no-x``; a field that may be ``None`` takes ``none``.
Every option defaults to "not given" (``None``), so that a value from a config file or a saved
run is only overridden by what is typed: :func:`given` tells which options were typed.

A field added to the dataclass becomes an option with no edit here.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, Any

import typer

from ..config.checks import check_value
from ..config.choices import choices
from ..errors import ConfigError

_NONE = ("none", "null")
_WORDS = {str: "text", int: "integer", float: "number", bool: "flag"}
#: Grid keys as options: comma-separated lists, each item read as the field it sweeps.
GRID_HELP = {
    "methods": "methods to sweep, e.g. splora,sppara",
    "criteria": "criteria to sweep, e.g. taylor,l1",
    "densities": "targets to sweep, e.g. 0.3,0.1 (filter densities) or sparsity=0.9",
    "seeds": "seeds to sweep, e.g. 0,1,2",
}


def flag(name: str) -> str:
    """``--name-with-dashes`` for the field ``name_with_underscores``."""
    return "--" + name.replace("_", "-")


def kinds(f: dataclasses.Field) -> tuple:
    kind = f.metadata.get("kind", str)
    return kind if isinstance(kind, tuple) else (kind,)


def describe(f: dataclasses.Field) -> str:
    """``integer >= 1, default 64`` and the like, from the field's rule."""
    rule = f.metadata
    kind = " or ".join(_WORDS.get(k, k.__name__) for k in kinds(f))
    low, high = rule.get("low"), rule.get("high")
    if low is not None and high is not None:
        left, right = "(" if rule.get("open_low") else "[", ")" if rule.get("open_high") else "]"
        kind += f" in {left}{low}, {high}{right}"
    elif low is not None:
        kind += f" {'>' if rule.get('open_low') else '>='} {low}"
    if rule.get("none") and bool not in kinds(f):
        kind += " or none"
    default = f.default if f.default is not dataclasses.MISSING else None
    shown = "none" if default is None else repr(default)
    names = choices(f.name)
    return f"{kind}, default {shown}" + (f"; one of: {', '.join(names)}" if names else "")


def read_text(f: dataclasses.Field, text: str):
    """``text`` typed as the value of field ``f``, converted and checked by the field's rule
    (a :class:`ConfigError` says what was expected)."""
    rule = {k: f.metadata.get(k) for k in ("low", "high", "open_low", "open_high", "none")}
    if rule["none"] and text.strip().lower() in _NONE:
        return None
    value: Any = text
    for kind in kinds(f):
        if kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
    if isinstance(value, str) and str not in kinds(f):
        expected = "an integer" if int in kinds(f) else "a number"
        raise ConfigError(f"expected {expected}, got {text!r}")
    return check_value(f.name, value, kind=kinds(f), **rule)


def _parser(f: dataclasses.Field):
    """What typer calls to read an option's text as field ``f`` (a ``ValueError``, here a
    :class:`ConfigError`, becomes typer's bad-parameter error)."""

    def parse(value):
        return read_text(f, value) if isinstance(value, str) else value

    return parse


def _metavar(f: dataclasses.Field) -> str:
    return " or ".join(_WORDS.get(k, k.__name__) for k in kinds(f)).upper()


def _field_parameter(f: dataclasses.Field, panel: str) -> inspect.Parameter:
    meaning = (f.metadata.get("help") or "").replace("[", r"\[")  # not rich markup
    text = f"{meaning} ({describe(f)})" if meaning else f"({describe(f)})"
    if bool in kinds(f):
        dashed = f.name.replace("_", "-")
        option = typer.Option(
            f"--{dashed}/--no-{dashed}", help=text, rich_help_panel=f"{panel}: on/off"
        )
        annotation = Annotated[bool | None, option]
    else:
        option = typer.Option(
            flag(f.name),
            help=text,
            parser=_parser(f),
            metavar=_metavar(f),
            rich_help_panel=panel,
        )
        annotation = Annotated[str | None, option]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=annotation)  # fmt: skip


def _grid_parameter(key: str, panel: str) -> inspect.Parameter:
    option = typer.Option(
        flag(key),
        help=f"{GRID_HELP.get(key, key)} (comma-separated list; makes a grid)",
        metavar="LIST",
        rich_help_panel=panel,
    )
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[str | None, option])  # fmt: skip


def with_config_options(config_cls, grid_keys: dict, panel: str = "Run settings"):
    """Decorate a command: every field of ``config_cls`` and every key of ``grid_keys`` (a
    list key -> the field it sweeps) is added to its options; the command receives them in
    one ``fields`` argument, a dict of every option (``None``: not given, see :func:`given`)."""
    fields = [f for f in dataclasses.fields(config_cls) if f.metadata]

    def decorate(func):
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "fields"]
        clash = {p.name for p in own} & ({f.name for f in fields} | set(grid_keys))
        if clash:
            raise TypeError(f"{func.__name__}: options {sorted(clash)} are also config fields")
        added = [_field_parameter(f, panel) for f in fields]
        added += [_grid_parameter(k, "Grid (lists)") for k in grid_keys]
        return extend(func, signature, own, added, "fields")

    return decorate


def extend(func, signature, own: list, added: list, into: str):
    """``func`` with the ``added`` parameters after its ``own`` ones (for typer, which reads
    the signature); their values reach ``func`` as one dict argument called ``into``."""
    names = [p.name for p in added]

    def command(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in names}
        return func(*args, **{into: values}, **kwargs)

    command.__name__, command.__doc__ = func.__name__, func.__doc__
    command.__signature__ = signature.replace(parameters=[*own, *added])
    command.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
    return command


def given(ctx, values: dict) -> dict:
    """The entries of ``values`` typed on the command line (or set by environment), not
    defaulted: an explicit ``--image-size none`` is kept as ``None``."""
    return {k: v for k, v in values.items() if _source(ctx, k) in ("COMMANDLINE", "ENVIRONMENT")}


def _source(ctx, name: str) -> str | None:
    source = ctx.get_parameter_source(name)  # typer may vendor click: compare by name
    return None if source is None else source.name
