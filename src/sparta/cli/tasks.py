"""``sparta tasks list|add|remove|build``: a task bank, many tasks on one shared base.

``add``, ``list`` and ``build`` rebuild the bank's base from ``--model`` (and ``--weights``/
``--checkpoint``/``--cifar-stem``/``--seed``: the shared base options). The first ``tasks
add`` records these options in the bank's ``bank.json``; later commands default to them
(:mod:`sparta.train.rebuild`). The base's fingerprint is checked against each task's, so a
different base is refused. ``remove`` only deletes a file: it needs no base.

Only ``add`` and ``remove`` write; ``list`` and ``build`` never create the bank's folder.
There is no ``switch`` command: a command line holds no model between two calls, so there is
no state to switch. ``build`` does what switching costs (it builds the task's compact model and
times it); a program switches with ``TaskBank.model(name)``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError, SpartaError, UnknownNameError
from .console import app, stderr, stdout, user_errors
from .options import FormatOpt, JsonOpt, output_format, print_result, with_base_options

tasks_app = typer.Typer(
    name="tasks",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="A task bank: many tasks on one shared base (see sparta.TaskBank).\n\n"
    "Example: `sparta tasks add bank/ digits runs/digits/task.safetensors --model digits_cnn`",
)
app.add_typer(tasks_app)

DirArg = Annotated[Path, typer.Argument(help="The bank's folder (one NAME.safetensors per task).")]
NameArg = Annotated[str, typer.Argument(help="Task name in the bank.")]
SUFFIX = ".safetensors"
_COLUMNS = ("task", "adapter", "bytes", "learned (stored)", "params", "MACs", "filter density")


def info_table(infos, title: str, errors: dict | None = None) -> Table:
    """One row per task; ``errors`` (file -> why) adds one row per unusable file."""
    table = Table(title=escape(title))
    for column in _COLUMNS:
        table.add_column(column, justify="left" if column in ("task", "adapter") else "right")
    for i in infos:
        table.add_row(
            escape(i.name),
            i.adapter,
            f"{i.bytes:,}",
            f"{i.learned_parameters:,}",
            "-" if i.params is None else f"{i.params:,}",
            "-" if i.macs is None else f"{i.macs:,}",
            "-" if i.density is None else f"{i.density:.4f}",
        )
    for file, error in sorted((errors or {}).items()):
        table.add_row(escape(file), f"[red]unusable: {escape(error)}[/]", *["-"] * 5)
    return table


def _existing_bank(directory: Path) -> Path:
    """``directory`` if it is a folder (a read-only command never creates one)."""
    if not directory.is_dir():
        what = "is a file, not a folder" if directory.exists() else "does not exist"
        raise ConfigError(
            f"bank folder {str(directory)!r} {what}; `sparta tasks add` creates a bank"
        )
    return directory


@tasks_app.command("list")
@with_base_options
def tasks_list(
    directory: DirArg,
    measure: Annotated[
        bool, typer.Option(help="Build every task to fill in params, MACs and density.")
    ] = False,
    fmt: FormatOpt = "table",
    as_json: JsonOpt = False,
    base: dict | None = None,
) -> None:
    """List the tasks of a bank; a file that is not a usable task is an error row, the others
    are listed.

    Example: `sparta tasks list bank/ --measure`
    """
    from ..train.rebuild import open_bank

    with user_errors():
        fmt = output_format(fmt, as_json)
        bank, _ = open_bank(_existing_bank(directory), base)
        infos = []
        for name in bank.names:
            try:
                infos.append(bank.info(name, measure))
            except SpartaError as exc:  # one bad task does not stop the listing
                bank.errors[f"{name}{SUFFIX}"] = " ".join(str(exc).split())
    bad = [{"name": f, "error": e} for f, e in sorted(bank.errors.items())]
    table = info_table(infos, f"tasks in {directory}", bank.errors)
    print_result([i.to_dict() for i in infos] + bad, fmt, table)
    for row in bad if fmt == "table" else []:  # also on stderr, for whoever reads it alone
        stderr.print(
            f"[bold yellow]unusable task file {escape(row['name'])}:[/] {escape(row['error'])}",
            soft_wrap=True,
        )


@tasks_app.command("add")
@with_base_options
def tasks_add(
    directory: DirArg,
    name: NameArg,
    task_file: Annotated[Path, typer.Argument(help="Task file (or a run folder) to add.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a task of the same name.")] = False,
    base: dict | None = None,
) -> None:
    """Add a task file to a bank (refused if it was trained on another base than the bank's).
    The first add records the base options in the bank's bank.json; later commands on the
    bank default to them.

    Example: `sparta tasks add bank/ digits runs/digits/task.safetensors --model digits_cnn`
    """
    from ..tasks import Task
    from ..train.rebuild import find_task, open_bank, remember_base

    with user_errors():
        loaded = Task.load(find_task(task_file))
        # The bank's base comes from the options and bank.json (not from the task's run), so
        # that every task added is checked against the same base.
        bank, spec = open_bank(directory, base, task=loaded)
        info = bank.add(name, loaded, overwrite=overwrite)
        remember_base(directory, spec)
    stdout.print(info_table([info], f"added to {directory}"))


@tasks_app.command("remove")
def tasks_remove(directory: DirArg, name: NameArg) -> None:
    """Remove a task (its file) from a bank; no base is needed.

    Example: `sparta tasks remove bank/ digits`
    """
    with user_errors():
        folder = _existing_bank(directory)
        names = sorted(p.name[: -len(SUFFIX)] for p in folder.glob(f"*{SUFFIX}"))
        if name not in names:  # only a file of the bank is ever deleted
            raise UnknownNameError("task", name, names)
        try:
            (folder / f"{name}{SUFFIX}").unlink()
        except OSError as exc:
            raise ConfigError(f"cannot delete task {name!r}: {exc.strerror or exc}") from None
    stdout.print(f"removed task {escape(name)} from {escape(str(directory))}", soft_wrap=True)


@tasks_app.command("build")
@with_base_options
def tasks_build(
    directory: DirArg,
    name: NameArg,
    show_model: Annotated[bool, typer.Option(help="Also print the compact model.")] = False,
    fmt: FormatOpt = "table",
    base: dict | None = None,
) -> None:
    """Build a task's compact model on the bank's base: what switching to it costs (the time
    printed), its size and MACs. Nothing is recorded (a program switches with
    TaskBank.model(name)).

    Example: `sparta tasks build bank/ digits --show-model`
    """
    from ..train.compare import parameters
    from ..train.rebuild import open_bank

    with user_errors():
        fmt = output_format(fmt)
        bank, _ = open_bank(_existing_bank(directory), base)
        t0 = time.perf_counter()
        compact = bank.model(name)
        seconds = time.perf_counter() - t0
        info = bank.info(name, measure=True)
    counts = {"base": parameters(bank.base), "compact": parameters(compact)}
    if fmt == "table":
        stdout.print(f"built task [bold]{escape(name)}[/] in {1000 * seconds:.1f} ms")
    data = {**info.to_dict(), "build_ms": 1000 * seconds, "parameters": counts}
    print_result(data, fmt, info_table([info], f"task {name}"))
    if fmt == "table":
        stdout.print(
            f"parameters: base {counts['base']:,} -> compact {counts['compact']:,}; "
            f"modules: {sum(1 for _ in compact.modules()):,}"
        )
        if show_model:
            stdout.print(escape(str(compact)))


@tasks_app.command("switch", hidden=True, context_settings={"ignore_unknown_options": True})
def tasks_switch(args: Annotated[list[str] | None, typer.Argument(hidden=True)] = None) -> None:
    """Renamed `sparta tasks build` (see its help)."""
    with user_errors():
        raise ConfigError(
            "`sparta tasks switch` is now `sparta tasks build`: a command line keeps no model "
            "between calls, so there is nothing to switch; `build` builds the task's compact "
            "model and prints what a switch costs (a program switches with TaskBank.model)"
        )
