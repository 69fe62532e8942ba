"""The ``sparta`` command line: thin commands over the public API.

    sparta adapters                        registered adapters, their layer kinds and options
    sparta inspect resnet50 --rank 8       what wrapping a torchvision model adapts and learns
    sparta demo [--toy]                    the paper's comparison on MobileNetV2 / Fashion-MNIST
    sparta run [CONFIG] [--field value]    train, prune and export one run or a grid (cli/runs.py)
    sparta report RUNS... --out DIR        Table-1-style summary of runs, with plots
    sparta eval TASK / sparta bench TASK   a task's compact model: test accuracy / speed (deploy.py)
    sparta tasks list|add|remove|switch    a task bank on one shared base (tasks.py)

Bad input (unknown names, out-of-range values) ends with exit code 2 and one red line on
stderr; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import SpartaError, __version__, get_adapter, list_adapters
from ..app.demo import DEMO_WORKERS
from ..app.inspection import adapter_options, inspect_summary

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


# -- sparta adapters -----------------------------------------------------------------------------
@app.command("adapters")
def adapters_command() -> None:
    """List the registered adapters, the layer kinds each adapts and its options.

    Example: `sparta adapters`
    """
    table = Table(title="registered adapters")
    for column in ("name", "layer kinds", "options (defaults)"):
        table.add_column(column)
    for name in list_adapters():
        cls = get_adapter(name)
        options = cls.resolve_options({})
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "(none)"
        table.add_row(name, ", ".join(cls.kinds), escape(shown))
    stdout.print(table)


# -- sparta inspect ------------------------------------------------------------------------------
def _print_summary(summary: dict) -> None:
    report, params = summary["report"], summary["params"]
    options = ", ".join(f"{k}={v!r}" for k, v in summary["options"].items())
    stdout.print(
        f"[bold]{summary['model']}[/] ({summary['num_classes']} classes), "
        f"adapter [bold]{summary['adapter']}[/] ({escape(options) or 'no options'})",
        soft_wrap=True,
    )
    stdout.print(
        f"adapted {len(report['adapted'])} layers, skipped {len(report['skipped'])}, "
        f"excluded by pattern {len(report['excluded'])}; "
        f"head (plain, trainable): {escape(', '.join(report['head']) or '(none)')}",
        soft_wrap=True,
    )
    if report["skipped"]:
        skipped = Table(title="skipped layers (left frozen, unadapted)")
        for column in ("layer", "type", "reason"):
            skipped.add_column(column)
        for s in report["skipped"]:
            skipped.add_row(escape(s["name"]), s["type"], escape(s["reason"]))
        stdout.print(skipped)
    stdout.print(_params_table(summary["adapter"], params))


def _params_table(adapter: str, params: dict) -> Table:
    table = Table(title="parameters")
    table.add_column("what")
    table.add_column("count", justify="right")
    ratio = params["learned_vs_full"]
    rows = [
        ("base parameters (frozen, shared by every task)", f"{params['base_total']:,}"),
        (f"learned per task: {adapter}", f"{params['learned']:,}"),
        ("learned per task: full fine-tuning (all parameters)", f"{params['full_finetune']:,}"),
        (f"{adapter} / full fine-tuning", f"{ratio:.2%} ({1 / ratio:.1f}x fewer)"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


@app.command("inspect")
def inspect_command(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Argument(help="torchvision classification model name, e.g. resnet50.")
    ],
    adapter: Annotated[str, typer.Option(help="Adapter name (see: sparta adapters).")] = "splora",
    rank: Annotated[int, typer.Option(help="Adapter rank (only for adapters with a rank).")] = 8,
    num_classes: Annotated[int, typer.Option(help="Classes of the new head.")] = 10,
    include: Annotated[
        list[str] | None, typer.Option(help="Only adapt modules matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Do not adapt modules matching this glob (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON dict instead.")] = False,
) -> None:
    """Wrap a torchvision model (random weights, nothing downloaded) and count what it learns.

    Prints what was adapted, skipped (with reasons) and kept as the head, and the learned
    parameters per task against full fine-tuning.

    Example: `sparta inspect resnet50 --rank 8`
    """
    source = ctx.get_parameter_source("rank")  # typer vendors click: compare by name
    rank_given = source is not None and source.name == "COMMANDLINE"
    with user_errors():
        options, takes_rank = adapter_options(adapter, rank)
        if rank_given and not takes_rank:
            stderr.print(f"note: adapter {adapter!r} has no rank option; --rank ignored")
        summary = inspect_summary(
            model, num_classes, adapter, options, include or None, exclude or None
        )
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


# -- sparta demo ---------------------------------------------------------------------------------
@app.command("demo")
def demo_command(
    out: Annotated[
        Path, typer.Option(help="Folder for results.json, plots and the run folders.")
    ] = Path("sparta-demo"),
    toy: Annotated[
        bool, typer.Option("--toy", help="The small digits demo instead (no assets needed).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for the subsets, init and data order.")] = 0,
    epochs: Annotated[
        int | None, typer.Option(help="Initial training epochs (default: the demo's own).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes running the methods side by side.")] = (
        DEMO_WORKERS
    ),
) -> None:
    """The paper's comparison on a real network, offline (2 CPU cores, about 4 minutes).

    ImageNet MobileNetV2 learns real Fashion-MNIST images by fine-pruning and by SPLoRA r8 with
    the paper's recipe, pruned to 30% and 10% FILTER density; prints accuracy, learned
    parameters in both accountings (stored / as the paper counts) and MFLOPs in Table 1's
    layout, whether the paper's claims hold here (with the structural ceiling of the parameter
    ratio), and each SPLoRA task's compact model, MACs and latency. Needs `make assets`. With
    --toy: the small digits demo (digits_cnn, 4 methods, 50/30/10% filter density).
    Writes OUT/results.json, plots and one run folder per method; a rerun reads finished runs
    back and resumes interrupted ones.

    Example: `sparta demo --out sparta-demo`, `sparta demo --toy`
    """
    from ..app.demo import run_demo

    with user_errors():
        run_demo(out_dir=out, seed=seed, epochs=epochs, toy=toy, workers=workers, console=stdout)


# The other commands live in their own modules and register themselves on ``app``.
from . import deploy, runs, tasks  # noqa: E402, F401


def main() -> None:
    """Entry point of the ``sparta`` script and of ``python -m sparta``."""
    app(prog_name="sparta")
