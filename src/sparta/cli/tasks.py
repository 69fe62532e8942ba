"""``sparta tasks list|add|remove|switch``: a task bank, many tasks on one shared base.

Every command rebuilds the bank's base from ``--model`` (and ``--weights``/``--checkpoint``/
``--cifar-stem``/``--seed``). The first ``tasks add`` records these options in the bank's
``bank.json``; later commands default to them (:mod:`sparta.train.rebuild`). The base's
fingerprint is checked against each task's, so a different base is refused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .console import app, stderr, stdout, user_errors
from .options import (
    CheckpointOpt,
    ClassesOpt,
    JsonOpt,
    ModelOpt,
    SeedOpt,
    StemOpt,
    WeightsOpt,
    base_options,
    print_result,
)

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


def info_table(infos, title: str) -> Table:
    table = Table(title=title)
    columns = ("task", "adapter", "bytes", "learned (stored)", "params", "MACs", "filter density")
    for column in columns:
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
    return table


@tasks_app.command("list")
def tasks_list(
    directory: DirArg,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    checkpoint: CheckpointOpt = None,
    cifar_stem: StemOpt = None,
    num_classes: ClassesOpt = None,
    seed: SeedOpt = None,
    measure: Annotated[
        bool, typer.Option(help="Build every task to fill in params, MACs and density.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the tasks of a bank.

    Example: `sparta tasks list bank/ --measure`
    """
    from ..train.rebuild import open_bank

    options = base_options(model, weights, checkpoint, cifar_stem, num_classes, seed)
    with user_errors():
        bank, _ = open_bank(directory, options)
        infos = bank.list(measure=measure)
    bad = [{"name": f, "error": e} for f, e in sorted(bank.errors.items())]
    table = info_table(infos, f"tasks in {directory}")
    print_result([i.to_dict() for i in infos] + bad, as_json, table)
    for row in [] if as_json else bad:
        stderr.print(
            f"[bold yellow]unusable task file {escape(row['name'])}:[/] {escape(row['error'])}"
        )


@tasks_app.command("add")
def tasks_add(
    directory: DirArg,
    name: NameArg,
    task_file: Annotated[Path, typer.Argument(help="Task file (or a run folder) to add.")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    checkpoint: CheckpointOpt = None,
    cifar_stem: StemOpt = None,
    num_classes: ClassesOpt = None,
    seed: SeedOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a task of the same name.")] = False,
) -> None:
    """Add a task file to a bank (refused if it was trained on another base than the bank's).
    The first add records the base options in the bank's bank.json; later commands on the
    bank default to them.

    Example: `sparta tasks add bank/ digits runs/digits/task.safetensors --model digits_cnn`
    """
    from ..tasks import Task
    from ..train.rebuild import find_task, open_bank, remember_base

    options = base_options(model, weights, checkpoint, cifar_stem, num_classes, seed)
    with user_errors():
        loaded = Task.load(find_task(task_file))
        # The bank's base comes from the options and bank.json (not from the task's run), so
        # that every task added is checked against the same base.
        bank, spec = open_bank(directory, options, task=loaded)
        info = bank.add(name, loaded, overwrite=overwrite)
        remember_base(directory, spec)
    stdout.print(info_table([info], f"added to {directory}"))


@tasks_app.command("remove")
def tasks_remove(
    directory: DirArg,
    name: NameArg,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    checkpoint: CheckpointOpt = None,
    cifar_stem: StemOpt = None,
    num_classes: ClassesOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Remove a task (and its file) from a bank.

    Example: `sparta tasks remove bank/ digits`
    """
    from ..train.rebuild import open_bank

    options = base_options(model, weights, checkpoint, cifar_stem, num_classes, seed)
    with user_errors():
        bank, _ = open_bank(directory, options)
        bank.remove(name)
    stdout.print(f"removed task {escape(name)!s} from {escape(str(directory))}")


@tasks_app.command("switch")
def tasks_switch(
    directory: DirArg,
    name: NameArg,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    checkpoint: CheckpointOpt = None,
    cifar_stem: StemOpt = None,
    num_classes: ClassesOpt = None,
    seed: SeedOpt = None,
    show_model: Annotated[bool, typer.Option(help="Also print the compact model.")] = False,
) -> None:
    """Switch to a task: build its compact model, print the switch time and a summary.

    Example: `sparta tasks switch bank/ digits --show-model`
    """
    from ..train.compare import parameters
    from ..train.rebuild import open_bank

    options = base_options(model, weights, checkpoint, cifar_stem, num_classes, seed)
    with user_errors():
        bank, _ = open_bank(directory, options)
        t0 = time.perf_counter()
        compact = bank.model(name)
        seconds = time.perf_counter() - t0
        info = bank.info(name, measure=True)
    stdout.print(f"switched to task [bold]{escape(name)}[/] in {1000 * seconds:.1f} ms")
    stdout.print(info_table([info], f"task {name}"))
    stdout.print(
        f"parameters: base {parameters(bank.base):,} -> compact {parameters(compact):,}; "
        f"modules: {sum(1 for _ in compact.modules()):,}"
    )
    if show_model:
        stdout.print(escape(str(compact)))
