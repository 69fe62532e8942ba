"""Deploying a task: ``sparta eval`` (test accuracy) and ``sparta bench`` (speed).

Both rebuild the shared base the task was trained on from ``--model`` (and
``--weights``/``--checkpoint``/``--cifar-stem``; ``--seed`` for a randomly initialised base,
default 0); when a run's ``result.json`` sits next to the task file, these default to the run's
config (:mod:`sparta.train.rebuild`). The base's fingerprint is checked against the task's, so
a different base is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import track
from rich.table import Table

from ..errors import ConfigError
from .console import app, stderr, user_errors
from .options import (
    DeviceOpt,
    FormatOpt,
    JsonOpt,
    output_format,
    print_result,
    with_base_options,
)

TaskArg = Annotated[Path, typer.Argument(help="Task file, or a run folder holding one.")]


def _bar(description: str):
    """A transient progress bar on stderr, as ``progress`` for the library's loops."""
    return lambda items: track(items, description=description, console=stderr, transient=True)


# -- sparta eval ----------------------------------------------------------------------------------
@app.command("eval")
@with_base_options
def eval_command(
    task: TaskArg,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset to test on (default: the run's).")
    ] = None,
    data_dir: Annotated[str | None, typer.Option(help="Dataset folder.")] = None,
    download: Annotated[
        bool, typer.Option(help="Let torchvision download a missing dataset.")
    ] = False,
    image_size: Annotated[int | None, typer.Option(help="Input side length.")] = None,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 256,
    device: DeviceOpt = "auto",
    fmt: FormatOpt = "table",
    as_json: JsonOpt = False,
    base: dict | None = None,
) -> None:
    """Build the task's compact model on the base and report its test accuracy.

    The compact model is the deployable one (`sparta.build`): adapters fused, pruned channels
    cut. Options default to the run's config when TASK is in a run folder.

    Example: `sparta eval runs/digits --batch-size 128`

    Example: `sparta eval task.safetensors --model resnet18 --cifar-stem --dataset cifar10 --data-dir data`
    """
    from torch.utils.data import DataLoader

    from ..data import load_dataset
    from ..tasks import Task, build
    from ..train import evaluate
    from ..train.build import subsets, tokenizer_for
    from ..train.compare import parameters
    from ..train.distributed import resolve_device
    from ..train.rebuild import find_task, resolve_base, run_accuracy, run_config

    options = base
    with user_errors():
        fmt = output_format(fmt, as_json)
        path = find_task(task)
        defaults = run_config(path)
        name = dataset if dataset is not None else defaults.get("dataset")
        if name is None:
            raise ConfigError("--dataset is required (no result.json next to the task)")
        loaded = Task.load(path)
        spec = resolve_base(defaults, options, loaded)
        dev = resolve_device(device)
        with stderr.status("loading the data, building the base and the compact model"):
            data = load_dataset(
                name,
                data_dir=data_dir if data_dir is not None else defaults.get("data_dir"),
                download=download or bool(defaults.get("download")),
                image_size=image_size if image_size is not None else defaults.get("image_size"),
                seed=spec.seed,
                tokenizer=tokenizer_for(name, spec.model),  # text: the model's tokenizer
                max_length=defaults.get("max_length"),
            )
            if name == defaults.get("dataset"):  # the run's own test subset, if it used one
                data = subsets(data, name, defaults.get("seed", 0), None,
                               defaults.get("test_examples"))  # fmt: skip
            base = spec.create()
            compact = build(base, loaded).to(dev)
        loader = DataLoader(data.test, batch_size=batch_size, shuffle=False)
        metrics = evaluate(compact, _bar("evaluating")(loader), dev)
    recorded = run_accuracy(path) if defaults else None
    params = {"base": parameters(base), "compact": parameters(compact)}
    data_out = {
        "task": str(path),
        "dataset": name,
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "samples": metrics["samples"],
        "run_accuracy": recorded,
        "params": params,
    }
    table = Table(title=f"{escape(str(path))} on {escape(name)} (test split)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("test accuracy (compact model)", f"{metrics['accuracy']:.4f}")
    if recorded is not None:
        table.add_row("accuracy recorded by the run", f"{recorded:.4f}")
    table.add_row("test loss", f"{metrics['loss']:.4f}")
    table.add_row("examples", f"{metrics['samples']:,}")
    table.add_row("parameters: base / compact", f"{params['base']:,} / {params['compact']:,}")
    print_result(data_out, fmt, table)


# -- sparta bench ---------------------------------------------------------------------------------
@app.command("bench")
@with_base_options
def bench_command(
    task: TaskArg,
    batch_size: Annotated[int, typer.Option(help="Examples per timed batch.")] = 1,
    image_size: Annotated[
        int | None, typer.Option(help="Input side length (default: the task's recorded one).")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls of each model.")] = 50,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls of each model first.")] = 5,
    runtime: Annotated[
        str,
        typer.Option(
            help="Where the two models run: eager (PyTorch, the models as built), torchscript "
            "or onnxruntime (each model served by sparta.deploy, checked against it first; "
            "onnxruntime needs the onnx extra: pip install -e '.[onnx]' in sparta's clone)."
        ),
    ] = "eager",
    device: DeviceOpt = "auto",
    fmt: FormatOpt = "table",
    as_json: JsonOpt = False,
    base: dict | None = None,
) -> None:
    """MACs, parameters and latency of the base against the task's compact model.

    Latency is the median over --repeats forward passes, base and compact timed in turn
    (interleaved) in eval mode without autograd, in the --runtime chosen; MACs and parameters
    are the models' own.

    Example: `sparta bench runs/digits --batch-size 1 --repeats 100`

    Example: `sparta bench runs/digits --batch-size 32 --runtime onnxruntime`
    """
    from ..tasks import Task, build
    from ..train.compare import compare, input_shapes, task_batch
    from ..train.distributed import resolve_device
    from ..train.rebuild import find_task, resolve_base, run_config

    options = base
    with user_errors():
        fmt = output_format(fmt, as_json)
        path = find_task(task)
        loaded = Task.load(path)
        spec = resolve_base(run_config(path), options, loaded)
        dev = resolve_device(device)
        with stderr.status("building the base and the compact model"):
            base = spec.create()
            compact = build(base, loaded)
        inputs = task_batch(loaded, batch_size, image_size, dev)
        measured = compare(
            base.to(dev), compact.to(dev), inputs, repeats, warmup, _bar("timing"), runtime
        )
    data = {"task": str(path), "inputs": input_shapes(inputs), "device": str(dev), **measured}
    _print_bench(data, repeats, fmt)


def _print_bench(data: dict, repeats: int, fmt: str) -> None:
    params, macs, ms = data["params"], data["macs"], data["latency_ms"]
    where = data["device"] if data["runtime"] == "eager" else f"{data['device']}, {data['runtime']}"
    table = Table(title=f"{escape(data['task'])}: batch {data['inputs']} on {where}")
    for column in ("", "base", "compact", "base / compact"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row(
        "parameters", f"{params['base']:,}", f"{params['compact']:,}",
        f"{params['base'] / max(params['compact'], 1):.2f}x",
    )  # fmt: skip
    table.add_row(
        "MACs", f"{macs['base']:,}", f"{macs['compact']:,}",
        f"{macs['base'] / max(macs['compact'], 1):.2f}x",
    )  # fmt: skip
    table.add_row(
        f"latency, median of {repeats} (ms)", f"{ms['base']:.3f}",
        f"{ms['compact']:.3f}", f"{data['speedup']:.2f}x (speed-up)",
    )  # fmt: skip
    print_result(data, fmt, table)
