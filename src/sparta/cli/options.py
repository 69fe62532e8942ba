"""Options that ``sparta eval``, ``sparta bench`` and ``sparta tasks ...`` share: the base the
task was trained on (see :mod:`sparta.train.rebuild`), the device and ``--json``."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from .console import stdout

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Base model name, as in the run (default: the run's, from result.json; for a "
        "bank, the one its bank.json records).",
    ),
]
WeightsOpt = Annotated[
    str | None, typer.Option(help="Pretrained weights of the base, e.g. DEFAULT.")
]
CheckpointOpt = Annotated[
    str | None, typer.Option(help="Local state dict the base was loaded from.")
]
StemOpt = Annotated[
    bool | None, typer.Option("--cifar-stem/--no-cifar-stem", help="CIFAR ResNet stem.")
]
ClassesOpt = Annotated[
    int | None,
    typer.Option(help="Classes of the base's head (default: the task head's output count)."),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(help="Seed the run started from (rebuilds a randomly initialised base)."),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:INDEX or mps.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON dict instead.")]


def base_options(model, weights, checkpoint, cifar_stem, num_classes, seed) -> dict:
    """The base options as given (``None``: not given), keyed as ``sparta.train.BaseSpec``."""
    return dict(
        model=model,
        weights=weights,
        checkpoint=checkpoint,
        cifar_stem=cifar_stem,
        num_classes=num_classes,
        seed=seed,
    )


def print_result(data, as_json: bool, table: Table) -> None:
    """``data`` as JSON with ``--json``, else ``table``."""
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        stdout.print(table)
