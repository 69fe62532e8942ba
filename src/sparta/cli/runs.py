"""``sparta run`` (experiments from a config file and/or flags) and ``sparta report``.

Every option of ``sparta run`` but ``--resume``, ``--overwrite``, ``--progress`` and
``--format`` is generated from the fields of :class:`~sparta.config.RunConfig` (type, range,
help and default from each field's rule; :mod:`sparta.cli.fields`) and the grid's list keys;
what ``sparta run`` does with its folder is in :mod:`sparta.cli.run_folder`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..config import GRID_KEYS, GridConfig, RunConfig
from ..errors import ConfigError
from . import run_folder
from .console import (
    UsageError,
    app,
    is_main_process,
    stderr,
    stdout,
    usage_message,
    user_errors,
)
from .fields import given, read_text, with_config_options
from .options import FormatOpt, output_format, print_result

RUN_HELP = """Train, prune and export: one run, or a grid of runs one after another.

CONFIG is an optional YAML/TOML/JSON file of RunConfig keys (plus the list keys methods,
criteria, densities and seeds for a grid); every option below overrides it. Each run writes
config.json, result.json, run.log and its model file into --output-dir; a grid's runs go into
OUTPUT_DIR/RUN_NAME and are resumed or skipped when done, so running a grid again continues it.
A folder that holds another run is refused unless --overwrite. Ctrl-C stops a run and prints
the command that resumes it.

Example: `sparta run --model digits_cnn --dataset digits --epochs 2 --steps 3 --target 0.3 --output-dir runs/digits`

Example: `sparta run --output-dir runs/digits --resume` (continue it: the folder's config.json gives every setting)

Example: `sparta run examples/grid.yaml --seeds 0,1 --device cpu` (a grid; run from a clone)

Example: `sparta run --recipe paper --method splora --target 0.1 --model digits_cnn --dataset digits`
(the paper's protocol; --target 0.1 keeps 10% of the filters, in 18 steps of 5%)
"""


# -- options -> config ----------------------------------------------------------------------------
def split_given(config_file, typed: dict) -> tuple[str | None, dict, dict]:
    """``(config file or None, RunConfig overrides, grid lists)`` from the options typed."""
    fields = RunConfig.__dataclass_fields__
    overrides = {k: v for k, v in typed.items() if k not in GRID_KEYS}
    grid = {k: _grid_list(k, fields[GRID_KEYS[k]], v) for k, v in typed.items() if k in GRID_KEYS}
    return (None if config_file is None else str(config_file)), overrides, grid


def _grid_list(key: str, field, text: str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--{key} expects a comma-separated list like a,b, got {text!r}")
    try:
        return [read_text(field, item) for item in items]
    except ConfigError as exc:
        raise ConfigError(f"--{key}: {exc}") from None


def parse_args(args: list[str]) -> tuple[str | None, dict, dict]:
    """``(config file or None, RunConfig overrides, grid lists)`` from the arguments of
    ``sparta run``, parsed by the command itself (the options typed, not their defaults)."""
    command = typer.main.get_command(app).commands["run"]
    try:
        ctx = command.make_context("run", list(args))
    except UsageError as exc:
        raise ConfigError(usage_message(exc)) from None
    names = [*RunConfig.__dataclass_fields__, *GRID_KEYS]
    typed = given(ctx, {k: ctx.params[k] for k in names if k in ctx.params})
    return split_given(ctx.params.get("config_file"), typed)


# -- sparta run -----------------------------------------------------------------------------------
def summary_table(results: list) -> Table:
    """Per run (name over its folder): test accuracy, validation accuracy when the run held out
    a split, learned parameters as stored and as the paper counts them, MACs, the density
    reached and of which units (filters for the channel pruner, blocks for the blocks pruner)
    and artifact bytes."""
    from ..app.results import run_record
    from ..config.pruning import pruner_granularity

    table = Table(title="runs")
    table.add_column("run / output dir", overflow="fold")
    columns = ("test acc", "val acc", "learned", "learned (paper)", "MACs", "density", "of")
    for column in (*columns, "artifact bytes"):
        table.add_column(column, justify="right")
    for res in results:
        r = run_record(res.result, res.output_dir)
        size = (
            "-"
            if r["artifact_bytes"] is None
            else f"{r['artifact_bytes']:,} ({r['artifact_file']})"
        )
        val, paper = res.final.get("val_accuracy"), res.final.get("learned_parameters_paper")
        table.add_row(
            f"{escape(str(r['name']))}\n[dim]{escape(r['output_dir'])}[/]",
            f"{r['accuracy']:.4f}",
            "-" if val is None else f"{val:.4f}",
            f"{r['learned_parameters']:,}",
            "-" if paper is None else f"{paper:,}",
            f"{r['macs']:,}",
            f"{r['density']:.4f}",
            "blocks" if pruner_granularity(res.config) == "blocks" else "filters",
            size,
        )
    return table


def _check_models(configs: list[RunConfig]) -> None:
    """Refuse an unknown model name before anything runs (and warns); a prefixed name
    (``timm:``, ``hf:``) is checked where it is built."""
    from ..errors import UnknownNameError
    from ..models import list_models

    for config in configs:
        if ":" not in config.model and config.model not in (known := list_models()):
            raise UnknownNameError("model", config.model, known)


@contextmanager
def progress_lines(enabled: bool) -> Iterator[None]:
    """While active, each line the run logs (an epoch, a pruning step, an evaluation) is also
    printed on stderr as it happens: what ``--no-progress`` shows instead of the bars."""
    from ..train.report import LOGGER

    if not enabled:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO)
    LOGGER.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)


@app.command("run", help=RUN_HELP)
@with_config_options(RunConfig, GRID_KEYS)
def run_command(
    ctx: typer.Context,
    config_file: Annotated[
        Path | None,
        typer.Argument(
            help="YAML/TOML/JSON file of RunConfig keys (optional).", metavar="[CONFIG]"
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --output-dir from its checkpoint; its saved config gives "
            "every setting (other options must agree with it).",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a run already in --output-dir.")
    ] = False,
    progress: Annotated[
        bool,
        typer.Option(
            help="Progress bars; --no-progress prints one line per epoch, pruning step and "
            "evaluation instead."
        ),
    ] = True,
    fmt: FormatOpt = "table",
    fields: dict | None = None,
) -> None:
    from ..train import run

    main = is_main_process()  # under torchrun, rank 0 alone prints
    with user_errors():
        fmt = output_format(fmt)
        if resume and overwrite:
            raise ConfigError("--resume continues a run, --overwrite replaces it: pass one")
        config = run_folder.resolve(*split_given(config_file, given(ctx, fields)), resume)
        configs = config.runs() if isinstance(config, GridConfig) else [config]
        _check_models(configs)
        run_folder.prepare(config, resume, overwrite, main)
        note = stdout if fmt == "table" else stderr  # stdout: the csv/json alone
        results = []
        with progress_lines(main and not progress):
            for index, one in enumerate(configs, 1):
                if main and len(configs) > 1:
                    note.print(f"[bold]run {index}/{len(configs)}[/]: {escape(one.name)}")
                again = not overwrite and (resume or isinstance(config, GridConfig))
                try:
                    results.append(run(one, progress=progress, resume=again))
                except KeyboardInterrupt:
                    if main:
                        stderr.print(
                            f"interrupted; resume with: {run_folder.resume_command(config)}",
                            soft_wrap=True,
                        )
                    raise typer.Exit(130) from None
                if main and results[-1].skipped:
                    note.print(
                        f"{escape(one.name)}: done before "
                        f"({escape(str(one.output_dir))}/result.json)",
                        soft_wrap=True,
                    )
    if main:
        data = [
            {"name": r.config.name, "output_dir": str(r.output_dir), **r.final} for r in results
        ]
        print_result(data, fmt, summary_table(results))


# -- sparta report ------------------------------------------------------------------------------
REPORT_FORMATS = ("markdown", "table", "csv", "json")


@app.command("report")
def report_command(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Run folders, result.json files, or folders searched recursively."),
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="What to print: markdown (the table; 'table' is the same), csv or json.",
        ),
    ] = "markdown",
    out: Annotated[
        Path | None,
        typer.Option(help="Write report.md, report.csv and the plots (PNG) into this folder."),
    ] = None,
) -> None:
    """Aggregate runs into a table like the paper's Table 1, and plot it.

    One row per group of runs whose every result-changing setting is equal (the seed, output
    folder, device, workers and data folder are not; a seed found twice counts once): test
    accuracy as mean ± std over seeds, learned parameters, filter density reached, MACs and the
    saved file's bytes (means), the baseline's compact file and how many times smaller the
    adapter's task file is, number of seeds. Rows that differ only in another setting (epochs,
    steps, ...) name it in a settings column; notes follow the table (on stderr for csv/json).
    With --out, also writes report.md, report.csv and accuracy against learned parameters (log
    scale), density and MACs as PNG files.

    Example: `sparta report runs/ --out report`
    """
    from ..app import results

    with user_errors():
        fmt = output_format(fmt, allowed=REPORT_FORMATS)
        rows = results.aggregate(results.load_runs(runs))
        written = results.write_report(rows, out) if out is not None else []
    if fmt == "json":
        typer.echo(json.dumps(list(rows), indent=2, default=str))
    else:
        typer.echo(results.to_csv(rows) if fmt == "csv" else results.to_markdown(rows), nl=False)
    for note in rows.notes if fmt in ("csv", "json") else []:  # markdown prints them itself
        stderr.print(f"note: {escape(note)}", soft_wrap=True)
    for path in written:  # on stderr: stdout is the table alone, for pipes
        stderr.print(f"wrote {escape(str(path))}", soft_wrap=True)
