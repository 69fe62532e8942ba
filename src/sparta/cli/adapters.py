"""``sparta adapters`` (the registered adapters) and ``sparta inspect`` (what wrapping a
torchvision model adapts and learns, from :mod:`sparta.app.inspection`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .. import get_adapter, list_adapters
from ..app.inspection import adapter_options, inspect_summary
from .console import app, stderr, stdout, user_errors
from .options import FormatOpt, JsonOpt, output_format, print_result


# -- sparta adapters -----------------------------------------------------------------------------
@app.command("adapters")
def adapters_command(fmt: FormatOpt = "table") -> None:
    """List the registered adapters, the layer kinds each adapts and its options.

    Example: `sparta adapters`, `sparta adapters --format csv`
    """
    with user_errors():
        fmt = output_format(fmt)
    table = Table(title="registered adapters")
    for column in ("name", "layer kinds", "options (defaults)"):
        table.add_column(column)
    data = []
    for name in list_adapters():
        cls = get_adapter(name)
        options = cls.resolve_options({})
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "(none)"
        table.add_row(name, ", ".join(cls.kinds), escape(shown))
        data.append({"name": name, "kinds": list(cls.kinds), "options": options})
    print_result(data, fmt, table)


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
    fmt: FormatOpt = "table",
    as_json: JsonOpt = False,
) -> None:
    """Wrap a torchvision model (random weights, nothing downloaded) and count what it learns.

    Prints what was adapted, skipped (with reasons) and kept as the head, and the learned
    parameters per task against full fine-tuning.

    Example: `sparta inspect resnet50 --rank 8`
    """
    source = ctx.get_parameter_source("rank")  # typer vendors click: compare by name
    rank_given = source is not None and source.name == "COMMANDLINE"
    with user_errors():
        fmt = output_format(fmt, as_json)
        options, takes_rank = adapter_options(adapter, rank)
        if rank_given and not takes_rank:
            stderr.print(f"note: adapter {adapter!r} has no rank option; --rank ignored")
        summary = inspect_summary(
            model, num_classes, adapter, options, include or None, exclude or None
        )
    if fmt == "table":
        _print_summary(summary)
    else:  # csv: the parameter table (the one table every model has)
        print_result(summary, fmt, _params_table(summary["adapter"], summary["params"]))
