"""Deploying tasks: ``sparta eval``, ``sparta bench`` and ``sparta tasks list|add|remove|switch``.

Every command rebuilds the shared base the task was trained on from ``--model`` (and
``--weights``/``--checkpoint``/``--cifar-stem``; ``--seed`` for a randomly initialised base,
default 0). For ``eval`` and ``bench``, when a run's ``result.json`` sits next to the task file,
these default to the run's config. A bank (``tasks``) records them in its ``bank.json`` at the
first ``tasks add``; later commands default to it. The base's fingerprint is checked against
each task's, so a different base is refused.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import track
from rich.table import Table
from torch import nn

from ..errors import ConfigError
from ..io import atomic_write
from . import app, stderr, stdout, user_errors

TASK_FILE = "task.safetensors"
RESULT_FILE = "result.json"
BANK_FILE = "bank.json"

# -- options shared by the commands -------------------------------------------------------------
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


@dataclass
class BaseSpec:
    """How to rebuild a base model: the model options of a run's config."""

    model: str
    weights: str | None = None
    checkpoint: str | None = None
    cifar_stem: bool = False
    num_classes: int | None = None
    seed: int = 0

    def create(self) -> nn.Module:
        """The base in eval mode, built as the run built it (seeded first, so a randomly
        initialised base draws the same weights)."""
        from ..models import create
        from ..train import seed_everything

        seed_everything(self.seed)
        model = create(
            self.model,
            num_classes=self.num_classes,
            weights=self.weights,
            checkpoint=self.checkpoint,
            cifar_stem=self.cifar_stem,
        )
        return model.eval()


def task_path(path: Path) -> Path:
    """A task file, or the ``task.safetensors`` of a run folder."""
    if path.is_dir():
        if not (path / TASK_FILE).is_file():
            raise ConfigError(f"folder {str(path)!r} holds no {TASK_FILE}")
        return path / TASK_FILE
    if not path.is_file():
        raise ConfigError(f"no such task file: {str(path)!r}")
    return path


def run_config(task_file: Path) -> dict:
    """The config of the run whose folder holds ``task_file`` (``{}`` if there is none)."""
    result = task_file.parent / RESULT_FILE
    if not result.is_file():
        return {}
    try:
        return dict(json.loads(result.read_text(encoding="utf-8")).get("config") or {})
    except (OSError, ValueError, AttributeError):
        stderr.print(f"note: ignoring unreadable {escape(str(result))}")
        return {}


def head_classes(task) -> int | None:
    """Outputs of the task's head (its first head module's ``weight``), if recorded."""
    tensors = task.manifest.get("tensors", {})
    for head in task.manifest.get("head", []):
        # A head with pruned inputs is stored under its mask parametrisation's key.
        for key in (f"{head}.weight", f"{head}.parametrizations.weight.original"):
            entry = tensors.get(key)
            if entry and entry.get("shape"):
                return int(entry["shape"][0])
    return None


def base_spec(
    defaults: dict, model, weights, checkpoint, cifar_stem, num_classes, seed, task=None
) -> BaseSpec:
    """Command-line options over the run's config (``defaults``)."""
    model = model if model is not None else defaults.get("model")
    if model is None:
        raise ConfigError(
            "--model is required (no result.json next to the task to take the run's model from)"
        )
    if num_classes is None and task is not None:
        num_classes = head_classes(task)
    return BaseSpec(
        model=model,
        weights=weights if weights is not None else defaults.get("weights"),
        checkpoint=checkpoint if checkpoint is not None else defaults.get("checkpoint"),
        cifar_stem=cifar_stem if cifar_stem is not None else bool(defaults.get("cifar_stem")),
        num_classes=num_classes,
        seed=seed if seed is not None else int(defaults.get("seed", 0)),
    )


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _print(data, as_json: bool, table: Table) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        stdout.print(table)


# -- sparta eval ----------------------------------------------------------------------------------
@app.command("eval")
def eval_command(
    task: Annotated[Path, typer.Argument(help="Task file, or a run folder holding one.")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    checkpoint: CheckpointOpt = None,
    cifar_stem: StemOpt = None,
    num_classes: ClassesOpt = None,
    seed: SeedOpt = None,
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
    as_json: JsonOpt = False,
) -> None:
    """Build the task's compact model on the base and report its test accuracy.

    The compact model is the deployable one (`sparta.build`): adapters fused, pruned channels
    cut. Options default to the run's config when TASK is in a run folder.

    Example: `sparta eval runs/digits --batch-size 128`

    Example: `sparta eval task.safetensors --model resnet18 --cifar-stem --dataset cifar10 --data-dir data`
    """
    from torch.utils.data import DataLoader

    from ..data import load_dataset
    from ..export import Task, build
    from ..train import evaluate
    from ..train.distributed import resolve_device

    with user_errors():
        path = task_path(task)
        defaults = run_config(path)
        name = dataset if dataset is not None else defaults.get("dataset")
        if name is None:
            raise ConfigError("--dataset is required (no result.json next to the task)")
        loaded = Task.load(path)
        spec = base_spec(
            defaults, model, weights, checkpoint, cifar_stem, num_classes, seed, loaded
        )
        dev = resolve_device(device)
        with stderr.status("loading the data, building the base and the compact model"):
            data = load_dataset(
                name,
                data_dir=data_dir if data_dir is not None else defaults.get("data_dir"),
                download=download or bool(defaults.get("download")),
                image_size=image_size if image_size is not None else defaults.get("image_size"),
                seed=spec.seed,
            )
            base = spec.create()
            compact = build(base, loaded).to(dev)
        loader = DataLoader(data.test, batch_size=batch_size, shuffle=False)
        batches = track(loader, description="evaluating", console=stderr, transient=True)
        metrics = evaluate(compact, batches, dev)
    recorded = None
    result = path.parent / RESULT_FILE
    if defaults and result.is_file():
        recorded = json.loads(result.read_text(encoding="utf-8"))["final"].get("accuracy")
    data_out = {
        "task": str(path),
        "dataset": name,
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "samples": metrics["samples"],
        "run_accuracy": recorded,
        "params": {"base": _params(base), "compact": _params(compact)},
    }
    table = Table(title=f"{escape(str(path))} on {escape(name)} (test split)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("test accuracy (compact model)", f"{metrics['accuracy']:.4f}")
    if recorded is not None:
        table.add_row("accuracy recorded by the run", f"{recorded:.4f}")
    table.add_row("test loss", f"{metrics['loss']:.4f}")
    table.add_row("examples", f"{metrics['samples']:,}")
    table.add_row("parameters: base / compact", f"{_params(base):,} / {_params(compact):,}")
    _print(data_out, as_json, table)


# -- sparta bench ---------------------------------------------------------------------------------
def batch_for(task, batch_size: int, image_size: int | None):
    """An example batch of the shape the task recorded, with ``batch_size`` examples and
    (for image inputs) ``image_size`` sides."""
    from ..inputs import make_inputs

    spec = copy.deepcopy(task.manifest.get("inputs"))
    if not spec or "tensor" not in spec:
        raise ConfigError("the task records no single-tensor input shape to benchmark with")
    shape = spec["tensor"]["shape"]
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    shape[0] = batch_size
    if image_size is not None:
        if len(shape) != 4 or image_size < 1:
            raise ConfigError("--image-size needs image inputs (N, C, H, W) and a size >= 1")
        shape[2] = shape[3] = image_size
    return make_inputs(spec)


def latency(models: dict[str, nn.Module], inputs, repeats: int, warmup: int) -> dict:
    """:func:`sparta.measure.latency` with a transient progress bar."""
    from ..measure import latency as measure_latency

    def bar(rounds):
        return track(rounds, description="timing", console=stderr, transient=True)

    return measure_latency(models, inputs, repeats, warmup, progress=bar)


@app.command("bench")
def bench_command(
    task: Annotated[Path, typer.Argument(help="Task file, or a run folder holding one.")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    checkpoint: CheckpointOpt = None,
    cifar_stem: StemOpt = None,
    num_classes: ClassesOpt = None,
    seed: SeedOpt = None,
    batch_size: Annotated[int, typer.Option(help="Examples per timed batch.")] = 1,
    image_size: Annotated[
        int | None, typer.Option(help="Input side length (default: the task's recorded one).")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls of each model.")] = 50,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls of each model first.")] = 5,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """MACs, parameters and latency of the base against the task's compact model.

    Latency is the median over --repeats forward passes, base and compact timed in turn
    (interleaved) in eval mode without autograd.

    Example: `sparta bench runs/digits --batch-size 1 --repeats 100`
    """
    from ..export import Task, build
    from ..measure import MacCounter
    from ..train.distributed import resolve_device

    with user_errors():
        path = task_path(task)
        loaded = Task.load(path)
        spec = base_spec(
            run_config(path), model, weights, checkpoint, cifar_stem, num_classes, seed, loaded
        )
        dev = resolve_device(device)
        with stderr.status("building the base and the compact model"):
            base = spec.create()
            compact = build(base, loaded)
        inputs = batch_for(loaded, batch_size, image_size).to(dev)
        base, compact = base.to(dev), compact.to(dev)
        macs = {
            m: MacCounter(net, inputs).count(net)
            for m, net in (("base", base), ("compact", compact))
        }
        seconds = latency({"base": base, "compact": compact}, inputs, repeats, warmup)
    params = {"base": _params(base), "compact": _params(compact)}
    data = {
        "task": str(path),
        "inputs": list(inputs.shape),
        "device": str(dev),
        "params": params,
        "macs": macs,
        "latency_ms": {k: 1000 * v for k, v in seconds.items()},
        "speedup": seconds["base"] / max(seconds["compact"], 1e-12),
    }
    table = Table(title=f"{escape(str(path))}: batch {list(inputs.shape)} on {dev}")
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
        f"latency, median of {repeats} (ms)", f"{1000 * seconds['base']:.3f}",
        f"{1000 * seconds['compact']:.3f}", f"{data['speedup']:.2f}x (speed-up)",
    )  # fmt: skip
    _print(data, as_json, table)


# -- sparta tasks ---------------------------------------------------------------------------------
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


def saved_base(directory: Path) -> dict:
    """The base options recorded in a bank's ``bank.json`` (``{}`` if it has none)."""
    path = directory / BANK_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["base"]
        if not isinstance(saved, dict) or not isinstance(saved.get("model"), str):
            raise ValueError("no base model recorded")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{str(path)!r} is unreadable ({err}); delete it and pass the base options"
        ) from None
    names = {f.name for f in fields(BaseSpec)}
    return {key: value for key, value in saved.items() if key in names}


def save_base(directory: Path, spec: BaseSpec) -> None:
    """Record the base of a bank in its ``bank.json`` (atomically)."""
    with atomic_write(directory / BANK_FILE, "w", encoding="utf-8") as f:
        json.dump({"base": asdict(spec)}, f, indent=2)
        f.write("\n")


def bank_spec(
    directory: Path, model, weights, checkpoint, cifar_stem, num_classes, seed, task=None
) -> BaseSpec:
    """The base of a bank: the options over its ``bank.json``; the head size defaults to the
    recorded one, else to that of ``task`` or of the bank's first task."""
    from ..export import Task

    saved = saved_base(directory)
    if model is None and not saved:
        raise ConfigError(
            f"--model is required: {str(directory)!r} has no {BANK_FILE} yet (the first "
            "`sparta tasks add` records the base options there)"
        )
    if num_classes is None:
        num_classes = saved.get("num_classes")
    if num_classes is None and task is None and directory.is_dir():
        for path in sorted(directory.glob("*.safetensors")):  # the first readable one
            try:
                task = Task.load(path)
                break
            except ConfigError:
                continue  # an unusable file: TaskBank lists it with its error
    return base_spec(saved, model, weights, checkpoint, cifar_stem, num_classes, seed, task)


def open_bank(directory: Path, *options, task=None):
    """``(TaskBank(base, directory), spec)`` with the base rebuilt from the base options
    (``model, weights, checkpoint, cifar_stem, num_classes, seed``) over the bank's bank.json."""
    from ..export import TaskBank

    spec = bank_spec(directory, *options, task=task)
    return TaskBank(spec.create(), directory), spec


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
    with user_errors():
        bank, _ = open_bank(directory, model, weights, checkpoint, cifar_stem, num_classes, seed)
        infos = bank.list(measure=measure)
    bad = [{"name": f, "error": e} for f, e in sorted(bank.errors.items())]
    _print([i.to_dict() for i in infos] + bad, as_json, info_table(infos, f"tasks in {directory}"))
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
    from ..export import Task

    with user_errors():
        path = task_path(task_file)
        loaded = Task.load(path)
        # The bank's base comes from the options and bank.json (not from the task's run), so
        # that every task added is checked against the same base.
        options = (model, weights, checkpoint, cifar_stem, num_classes, seed)
        bank, spec = open_bank(directory, *options, task=loaded)
        info = bank.add(name, loaded, overwrite=overwrite)
        if not (directory / BANK_FILE).is_file():
            save_base(directory, spec)
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
    with user_errors():
        bank, _ = open_bank(directory, model, weights, checkpoint, cifar_stem, num_classes, seed)
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
    with user_errors():
        bank, _ = open_bank(directory, model, weights, checkpoint, cifar_stem, num_classes, seed)
        t0 = time.perf_counter()
        compact = bank.model(name)
        seconds = time.perf_counter() - t0
        info = bank.info(name, measure=True)
    stdout.print(f"switched to task [bold]{escape(name)}[/] in {1000 * seconds:.1f} ms")
    stdout.print(info_table([info], f"task {name}"))
    base = bank.base
    stdout.print(
        f"parameters: base {_params(base):,} -> compact {_params(compact):,}; "
        f"modules: {sum(1 for _ in compact.modules()):,}"
    )
    if show_model:
        stdout.print(escape(str(compact)))
