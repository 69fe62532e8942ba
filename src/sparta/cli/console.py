"""The ``sparta`` Typer app, its two consoles and how a user error ends a command; every command
module registers its commands on :data:`app`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from .. import SpartaError, __version__

app = typer.Typer(
    name="sparta",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
)
stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into one red line and exit code 2."""
    try:
        yield
    except (SpartaError, ValueError, TypeError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        stderr.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        raise typer.Exit(2) from None


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"sparta {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Structured Pruning Adapters: tiny per-task tensors on a frozen, shared base network.

    Examples: `sparta adapters`, `sparta inspect resnet50 --rank 8`, `sparta demo`,
    `sparta run --model digits_cnn --dataset digits --output-dir runs/digits`,
    `sparta report runs/ --out report`
    """
