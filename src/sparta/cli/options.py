"""Options several commands share, each declared once: the base a task was trained on
(``@with_base_options``: ``sparta eval``, ``bench`` and ``tasks add|list|switch``; see
:mod:`sparta.train.rebuild`), the device, and how a table is printed (``--format``)."""

from __future__ import annotations

import csv
import inspect
import io
import json
import re
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ..errors import ConfigError
from .console import stdout
from .fields import extend

#: The base model's options, keyed as ``sparta.train.BaseSpec`` (``None``: not given).
BASE_OPTIONS = {
    "model": Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Base model name, as in the run (default: the run's, from result.json; for a "
            "bank, the one its bank.json records).",
            rich_help_panel="Base model",
        ),
    ],
    "weights": Annotated[
        str | None,
        typer.Option(
            help="Pretrained weights of the base, e.g. DEFAULT.", rich_help_panel="Base model"
        ),
    ],
    "checkpoint": Annotated[
        str | None,
        typer.Option(
            help="Local state dict the base was loaded from.", rich_help_panel="Base model"
        ),
    ],
    "cifar_stem": Annotated[
        bool | None,
        typer.Option(
            "--cifar-stem/--no-cifar-stem", help="CIFAR ResNet stem.", rich_help_panel="Base model"
        ),
    ],
    "num_classes": Annotated[
        int | None,
        typer.Option(
            help="Classes of the base's head (default: the task head's output count).",
            rich_help_panel="Base model",
        ),
    ],
    "seed": Annotated[
        int | None,
        typer.Option(
            help="Seed the run started from (rebuilds a randomly initialised base).",
            rich_help_panel="Base model",
        ),
    ],
}


def with_base_options(func):
    """Decorate a command: the six base options are added to its options and reach it as one
    ``base`` dict keyed as ``sparta.train.BaseSpec`` (``None``: not given)."""
    signature = inspect.signature(func, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "base"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
        for name, kind in BASE_OPTIONS.items()
    ]
    return extend(func, signature, own, added, "base")


DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:INDEX or mps.")]
#: How a command prints its table: as a table, CSV or JSON (``--json``: ``--format json``).
FORMATS = ("table", "csv", "json")
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="How to print the result: table, csv or json (tables never wrap mid-word when piped).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (same as --format json).")]


def output_format(fmt: str, as_json: bool = False, allowed=FORMATS) -> str:
    """The format asked for (``--json`` wins), checked against ``allowed``."""
    fmt = "json" if as_json else fmt
    if fmt not in allowed:
        raise ConfigError(f"--format must be one of {', '.join(allowed)}, got {fmt!r}")
    return fmt


def table_csv(table: Table) -> str:
    """The cells of ``table`` as CSV (markup removed, a cell's lines joined by a space)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([_plain(c.header) for c in table.columns])
    cells = [list(c.cells) for c in table.columns]
    for row in zip(*cells, strict=True):
        writer.writerow([_plain(cell) for cell in row])
    return out.getvalue()


def _plain(cell) -> str:
    """A cell's text; a number shown with thousands separators ("1,234") as a plain one."""
    text = cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain
    text = " ".join(text.split())
    return text.replace(",", "") if _GROUPED.fullmatch(text) else text


_GROUPED = re.compile(r"-?\d{1,3}(,\d{3})+")


def print_result(data, fmt: str | bool, table: Table) -> None:
    """``data`` as JSON (``fmt == "json"``, or ``True`` as from ``--json``), ``table`` as CSV
    or as a table."""
    if fmt is True or fmt == "json":
        typer.echo(json.dumps(data, indent=2, default=str))
    elif fmt == "csv":
        typer.echo(table_csv(table), nl=False)
    else:
        stdout.print(table)
