"""The ``sparta`` Typer app, its two consoles and how a user error ends a command; every command
module registers its commands on :data:`app`.

What a user sees, whatever the command:

- bad input (an unknown name, an out-of-range value, a malformed option) ends with exit code 2
  and one red ``error:`` line on stderr, naming the command-line flags (``--overwrite``, not
  ``overwrite=True``); anything else is a bug and keeps its traceback;
- a warning of the library is one ``warning: <message>`` line on stderr, once per message, from
  the first process only under torchrun (the library itself is untouched: only the CLI replaces
  ``warnings.showwarning``, and only while a command runs);
- tables are as wide as their content when the output is not a terminal (piped, redirected):
  no run name or path is broken mid-word.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from typer.core import TyperGroup

from .. import SpartaError, __version__

#: The width of a console that is not a terminal: wide enough for any table row.
PIPE_WIDTH = 10_000


class _Console(Console):
    """A console that does not wrap when its output is not a terminal (unless COLUMNS says a
    width): rich would otherwise wrap tables at 80 columns, breaking names mid-word."""

    @property
    def size(self) -> ConsoleDimensions:
        if self._width is None and not self.is_terminal and not os.environ.get("COLUMNS"):
            return ConsoleDimensions(PIPE_WIDTH, super().size.height)
        return super().size

    @size.setter
    def size(self, new_size) -> None:
        Console.size.fset(self, new_size)


def one_line(message: str) -> str:
    """``message`` on one line, with library parameter spellings as command-line flags
    (``overwrite=True`` -> ``--overwrite``, ``checkpoint=...`` -> ``--checkpoint ...``)."""
    message = " ".join(str(message).split())

    def as_flag(match: re.Match) -> str:
        name, value = match.group(1).replace("_", "-"), match.group(2)
        if value == "True":
            return f"--{name}"
        return f"--no-{name}" if value == "False" else f"--{name} ..."

    message = re.sub(r"(?<![\w.-])([a-z][a-z_]*)=(True|False|\.\.\.)", as_flag, message)
    return re.sub(r"(--[\w-]+) \(\1\)", r"\1", message)  # "--download (--download)": once


def error_line(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {escape(one_line(message))}", soft_wrap=True)


#: click's usage error (typer may vendor its own click: found through typer's BadParameter).
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_NO_ARGS = getattr(sys.modules[UsageError.__module__], "NoArgsIsHelpError", ())


class OneLineErrors(TyperGroup):
    """The app's command group: a malformed command line (unknown option, bad value, missing
    argument) is one ``error:`` line and exit code 2, like every other bad input."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except _NO_ARGS:
            raise
        except UsageError as exc:
            error_line(usage_message(exc))
            raise typer.Exit(2) from None


def usage_message(exc) -> str:
    """One line for a usage error: the option and what is wrong with its value."""
    message = exc.format_message()
    param = getattr(exc, "param", None)
    if isinstance(exc, typer.BadParameter) and param is not None and param.opts:
        text = str(exc.message).removeprefix("Value error, ")  # pydantic's prefix
        message = f"{param.opts[0]}: {text}"
    command = exc.ctx.command_path if exc.ctx is not None else "sparta"
    return f"{message} (see `{command} --help`)"


app = typer.Typer(
    name="sparta",
    cls=OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
)
stdout = _Console(highlight=False)
stderr = _Console(stderr=True, highlight=False)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into one red line and exit code 2."""
    try:
        yield
    except (SpartaError, ValueError, TypeError) as exc:
        error_line(str(exc) or type(exc).__name__)
        raise typer.Exit(2) from None


def is_main_process() -> bool:
    """Whether this is the process that prints (rank 0 under torchrun, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """While active, each distinct warning is one ``warning: <message>`` line on stderr (rank
    0 only), whatever the warning filters say about repeats."""
    seen: set[str] = set()
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = one_line(str(message))
        if text in seen or not is_main_process():
            return
        seen.add(text)
        stderr.print(f"[yellow]warning:[/] {escape(text)}", soft_wrap=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"sparta {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
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
    ctx.with_resource(one_line_warnings())
