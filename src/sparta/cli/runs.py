"""``sparta run`` (experiments from a config file and/or flags) and ``sparta report``."""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..config import GRID_KEYS, GridConfig, RunConfig, recipes, resolve_config
from ..errors import ConfigError
from .console import app, stderr, stdout, user_errors

#: What each RunConfig field means, for ``sparta run --help``. A field's own ``help`` metadata
#: wins; a field in neither place is still listed, with its type, range and default.
FIELD_HELP = {
    "recipe": "a named preset applied first, e.g. paper (flags and file keys override it): "
    + "; ".join(f"{r.name}: {r.summary}" for r in recipes().values()),
    "model": "model name: torchvision (resnet18, ...), timm:NAME or digits_cnn",
    "weights": "pretrained weights, e.g. DEFAULT (torchvision downloads them once)",
    "checkpoint": "a local state dict to start from",
    "cifar_stem": "3x3 stem without max-pool (CIFAR ResNets)",
    "dataset": "cifar10, cifar100, flowers102, pets, imagefolder, digits, ...",
    "data_dir": "where datasets are read from (and downloaded to)",
    "download": "let torchvision download a missing dataset",
    "image_size": "resize inputs to this side length",
    "method": "finetune, fine-pruning or an adapter (splora, sppara, ...)",
    "rank": "adapter rank (adapters that take one)",
    "init_scale": "adapters start uniform(+-init_scale); none: each adapter's default (1e-4)",
    "criterion": "importance criterion: taylor, l1, l2, gradient, lrp, random",
    "target": "a bare number is a FILTER density, the fraction of filters kept (the paper's "
    "meaning: 0.3 keeps 30% of the filters); sparsity=S is the fraction of WEIGHTS removed, "
    "macs=F the fraction of MACs kept",
    "steps": "pruning steps (0: no pruning); overrides step_fraction",
    "step_fraction": "share of the original filters removed per step: steps derived as "
    "round((1 - density) / step_fraction) (paper recipe: 0.05)",
    "schedule": "pruning schedule: linear, geometric, cubic, one-shot",
    "ranking": "global or local ranking of channels",
    "round_to": "keep channel counts multiples of this",
    "scoring_batches": "training batches scored before each pruning step",
    "epochs": "epochs of initial training",
    "recovery_epochs": "epochs of training after every pruning step",
    "batch_size": "global batch size",
    "optimizer": "sgd, adam or adamw",
    "lr": "learning rate",
    "weight_decay": "weight decay",
    "momentum": "SGD momentum",
    "lr_schedule": "cosine, constant or step (lr / 10 at 50% and 75%), over each training phase",
    "adapter_lr_scale": "multiplies lr for adapter parameters only (head, norms, biases keep lr)",
    "val_fraction": "share of the training data held out (seeded, stratified) as a validation "
    "split; records val_accuracy",
    "seed": "seed of data order, initialisation and split",
    "output_dir": "folder of the run (of a grid: parent of its runs)",
    "device": "auto, cpu, cuda, cuda:INDEX or mps",
    "workers": "data loader worker processes",
    "find_unused_parameters": "DDP option for models with unused parameters",
    "sync_batchnorm": "synchronised BatchNorm under DDP (CUDA)",
}
#: Grid keys as flags: comma-separated lists.
GRID_HELP = {
    "methods": "methods to sweep, e.g. splora,sppara",
    "criteria": "criteria to sweep, e.g. taylor,l1",
    "densities": "targets to sweep, e.g. 0.3,0.1 (filter densities) or sparsity=0.9",
    "seeds": "seeds to sweep, e.g. 0,1,2",
}
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null")


# -- flags from the dataclass --------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(RunConfig)}


def _kinds(f: dataclasses.Field) -> tuple:
    kind = f.metadata.get("kind", str)
    return kind if isinstance(kind, tuple) else (kind,)


def _describe(f: dataclasses.Field) -> str:
    """``integer >= 1, default 64`` and the like, from the field's validation rule."""
    rule = f.metadata
    words = {str: "text", int: "integer", float: "number", bool: "flag"}
    kind = " or ".join(words.get(k, k.__name__) for k in _kinds(f))
    low, high = rule.get("low"), rule.get("high")
    if low is not None and high is not None:
        left, right = "(" if rule.get("open_low") else "[", ")" if rule.get("open_high") else "]"
        kind += f" in {left}{low}, {high}{right}"
    elif low is not None:
        kind += f" {'>' if rule.get('open_low') else '>='} {low}"
    default = f.default if f.default is not dataclasses.MISSING else None
    return f"{kind}, default {default!r}" if default is not None else f"{kind}, default none"


def fields_help() -> str:
    """The Markdown list of every flag of ``sparta run``, generated from :class:`RunConfig`."""
    lines = []
    for name, f in _fields().items():
        meaning = f.metadata.get("help") or FIELD_HELP.get(name, "")
        meaning = meaning.replace("<", "&lt;")  # Markdown would take <name> for an HTML tag
        flag = f"`{_flag(name)}`" + (
            f" / `--no-{name.replace('_', '-')}`" if bool in _kinds(f) else ""
        )
        lines.append(f"* {flag} ({_describe(f)})" + (f": {meaning}" if meaning else ""))
    for key, meaning in GRID_HELP.items():
        lines.append(f"* `{_flag(key)}` (comma-separated list; makes a grid): {meaning}")
    return "\n".join(lines)


def _convert(flag: str, f: dataclasses.Field, text: str):
    """``text`` given on the command line as the value of field ``f``."""
    kinds = _kinds(f)
    if f.metadata.get("none") and text.lower() in _NONE:
        return None
    if bool in kinds:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{flag} expects true or false, got {text!r}")
    for kind in kinds:
        if kind is str:
            continue
        try:
            return kind(text)
        except ValueError:
            pass
    if str in kinds:
        return text
    expected = "an integer" if int in kinds else "a number"
    raise ConfigError(f"{flag} expects {expected}, got {text!r}")


def _grid_value(key: str, text: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if key == "seeds":
        try:
            return [int(t) for t in items]
        except ValueError:
            raise ConfigError(f"--seeds expects integers like 0,1,2, got {text!r}") from None
    if key == "densities":
        return [_convert("--densities", _fields()["target"], t) for t in items]
    return items


def _unknown(flag: str) -> ConfigError:
    known = [_flag(n) for n in (*_fields(), *GRID_KEYS)]
    known += [f"--no-{n.replace('_', '-')}" for n, f in _fields().items() if bool in _kinds(f)]
    hint = difflib.get_close_matches(flag.split("=")[0], known, n=1)
    return ConfigError(
        f"unknown option {flag!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + "; see `sparta run --help` for every option"
    )


def parse_args(args: list[str]) -> tuple[str | None, dict, dict]:
    """``(config file or None, RunConfig overrides, grid overrides)`` from the extra arguments
    of ``sparta run``: ``--field value``, ``--field=value``, ``--flag``/``--no-flag`` for
    booleans, ``--seeds 0,1`` for grid lists, and at most one config file."""
    fields = _fields()
    config, overrides, grid = None, {}, {}
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-") or token == "-":
            if config is not None:
                raise ConfigError(f"one config file at most, got {config!r} and {token!r}")
            config = token
            continue
        if not token.startswith("--"):
            raise _unknown(token)
        name, eq, value = token[2:].partition("=")
        key = name.replace("-", "_")
        negated = key.startswith("no_") and key[3:] in fields and bool in _kinds(fields[key[3:]])
        if negated:
            if eq:
                raise ConfigError(f"--{name} takes no value")
            overrides[key[3:]] = False
            continue
        if key not in fields and key not in GRID_KEYS:
            raise _unknown(token)
        is_bool = key in fields and bool in _kinds(fields[key])
        if not eq:
            following = args[i] if i < len(args) else None
            if is_bool and (following is None or following.lower() not in _TRUE + _FALSE):
                overrides[key] = True
                continue
            if following is None or (following.startswith("--") and not is_bool):
                raise ConfigError(f"--{name} needs a value")
            value = following
            i += 1
        if key in GRID_KEYS:
            grid[key] = _grid_value(key, value)
        else:
            overrides[key] = _convert(f"--{name}", fields[key], value)
    return config, overrides, grid


# -- sparta run ---------------------------------------------------------------------------------
RUN_HELP = f"""Train, prune and export: one run, or a grid of runs one after another.

CONFIG is an optional YAML/TOML/JSON file of RunConfig keys (plus the list keys methods,
criteria, densities and seeds for a grid); every flag below overrides it. A grid's runs go
into OUTPUT_DIR/RUN_NAME and are resumed or skipped when done, so running a grid again
continues it. Each run writes result.json, run.log and (adapters) task.safetensors.

Example: `sparta run --model digits_cnn --dataset digits --epochs 2 --steps 3 --target 0.3 --output-dir runs/digits`

Example: `sparta run grid.yaml --seeds 0,1 --device cpu`

Example: `sparta run --recipe paper --method splora --target 0.1 --model digits_cnn --dataset digits`
(the paper's protocol; --target 0.1 keeps 10% of the filters, in 18 steps of 5%)

Options (every RunConfig field; booleans also as `--flag true|false`):

{fields_help()}
"""


def summary_table(results: list) -> Table:
    """Per run (name over its folder): test accuracy, validation accuracy when the run held out
    a split, learned parameters as stored and as the paper counts them, MACs, filter density
    and artifact bytes."""
    from ..app.results import run_record

    table = Table(title="runs")
    table.add_column("run / output dir", overflow="fold")
    columns = ("test acc", "val acc", "learned", "learned (paper)", "MACs", "filter density")
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
            size,
        )
    return table


@app.command(
    "run",
    help=RUN_HELP,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    options_metavar="[CONFIG] [--FIELD VALUE]...",
)
def run_command(
    ctx: typer.Context,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a single run from its checkpoint.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    from ..train import run

    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone prints
    with user_errors():
        path, overrides, grid = parse_args(list(ctx.args))
        config = resolve_config(path, overrides, grid)
        configs = config.runs() if isinstance(config, GridConfig) else [config]
        results = []
        for index, one in enumerate(configs, 1):
            if main and len(configs) > 1:
                stdout.print(f"[bold]run {index}/{len(configs)}[/]: {escape(one.name)}")
            again = resume or isinstance(config, GridConfig)
            results.append(run(one, progress=progress, resume=again))
            if main and results[-1].skipped:
                stdout.print(
                    f"{escape(one.name)}: done before ({escape(str(one.output_dir))}/result.json)",
                    soft_wrap=True,
                )
    if main:
        stdout.print(summary_table(results))


# -- sparta report ------------------------------------------------------------------------------
@app.command("report")
def report_command(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Run folders, result.json files, or folders searched recursively."),
    ],
    fmt: Annotated[
        str, typer.Option("--format", help="What to print: markdown or csv.")
    ] = "markdown",
    out: Annotated[
        Path | None,
        typer.Option(help="Write report.md, report.csv and the plots (PNG) into this folder."),
    ] = None,
) -> None:
    """Aggregate runs into a table like the paper's Table 1, and plot it.

    One row per (model, dataset, method, criterion, target): test accuracy as mean ± std over
    seeds, learned parameters, filter density reached, MACs and artifact bytes (means), number of
    seeds. With --out, also writes report.md, report.csv and accuracy against learned
    parameters (log scale), density and MACs as PNG files.

    Example: `sparta report runs/ --out report`
    """
    from ..app import results

    with user_errors():
        if fmt not in ("markdown", "csv"):
            raise ConfigError(f"--format must be markdown or csv, got {fmt!r}")
        rows = results.aggregate(results.load_runs(runs))
        written = results.write_report(rows, out) if out is not None else []
    typer.echo(results.to_markdown(rows) if fmt == "markdown" else results.to_csv(rows), nl=False)
    for path in written:  # on stderr: stdout is the table alone, for pipes
        stderr.print(f"wrote {escape(str(path))}", soft_wrap=True)
