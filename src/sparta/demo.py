"""A short, real transfer-learning demo: one frozen base, three ways to learn a new task.

Everything here is measured, offline, on CPU, in well under a minute:

1. pretrain a small CNN on scikit-learn's 8x8 handwritten digits 0-4 (the *source* task);
2. learn digits 5-9 (the *target* task, disjoint classes) with a fresh 5-class head, by full
   fine-tuning, by SPLoRA (rank 4) and by SPPaRA, each with the same optimiser, epochs and
   data order;
3. for each method report test accuracy, learned parameters (paper accounting), mean wall time
   per training step, the largest difference between the adapted model and ``sparta.fuse`` of
   it, and whether the frozen base tensors are still bit-identical.

Pruning and export are not part of the library yet, so they are not part of the demo either.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn

from . import __version__, fuse, learned_parameters, wrap

#: Training hyper-parameters shared by every method (only the trainable set differs).
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
TEST_FRACTION = 0.25
SPLORA_RANK = 4
DEFAULT_EPOCHS = 15
#: Batches of 32 8x8 images are far too small to share between threads: on a busy 2-core
#: machine two intra-op threads made a step ~10x slower than one. The demo uses one thread and
#: restores the caller's setting afterwards.
DEMO_THREADS = 1


@dataclass
class Split:
    """Images ``(N, 1, 8, 8)`` in [0, 1] and labels ``(N,)`` renumbered from 0."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


# -- data and model ------------------------------------------------------------------------------
def load_task(classes: range, seed: int) -> Split:
    """Digits of ``classes`` from ``sklearn.datasets.load_digits``, stratified split by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    keep = (digits.target >= classes.start) & (digits.target < classes.stop)
    images = torch.tensor(digits.images[keep] / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target[keep] - classes.start, dtype=torch.long)
    parts = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=seed, stratify=labels
    )
    x_train, x_test, y_train, y_test = parts
    return Split(x_train, y_train, x_test, y_test)


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def small_cnn(num_classes: int) -> nn.Sequential:
    """Three 3x3 conv + BatchNorm blocks (16, 32, 64 channels), global pool, Linear head."""
    features = nn.Sequential(
        *_conv_block(1, 16),
        *_conv_block(16, 32),
        nn.MaxPool2d(2),
        *_conv_block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(64, num_classes)))


# -- training and evaluation ---------------------------------------------------------------------
def train(model: nn.Module, data: Split, epochs: int, seed: int, progress, task) -> dict:
    """Adam on the trainable parameters; the data order depends only on ``seed``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=LEARNING_RATE)
    order = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    step_times: list[float] = []
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(data.y_train), generator=order).split(BATCH_SIZE):
            x, y = data.x_train[idx], data.y_train[idx]
            start = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimiser.step()
            step_times.append(time.perf_counter() - start)
        progress.update(task, advance=1, loss=f"{loss.item():.3f}")
    return {"steps": len(step_times), "ms_per_step": 1e3 * sum(step_times) / len(step_times)}


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def fuse_max_diff(model: nn.Module, x: Tensor) -> float:
    """Largest |adapted - fused| output in eval mode.

    The adapted output is computed with autograd enabled so that every adapted layer runs its
    training path; under ``no_grad`` it would run its own cached fused weights instead.
    """
    model.eval()
    with torch.enable_grad():
        adapted = model(x).detach()
    with torch.no_grad():
        fused = fuse(model)(x)
    return (adapted - fused).abs().max().item()


def frozen_unchanged(model: nn.Module, before: dict[str, Tensor]) -> tuple[bool, int]:
    """Whether every frozen parameter of an adapted model equals the base's tensor bit for bit.

    ``AdaptedLayer`` keeps the frozen layer as ``.base``, so ``features.0.base.weight`` is the
    base's ``features.0.weight``. Returns ``(all equal, number of frozen tensors compared)``.
    """
    frozen = {
        name.replace(".base.", "."): p
        for name, p in model.named_parameters()
        if not p.requires_grad
    }
    equal = all(name in before and torch.equal(p, before[name]) for name, p in frozen.items())
    return bool(frozen) and equal, len(frozen)


# -- the three methods ---------------------------------------------------------------------------
def _methods(start: nn.Module, seed: int) -> OrderedDict:
    """Full fine-tuning, SPLoRA and SPPaRA task models, all starting from ``start``."""
    full = copy.deepcopy(start)
    for p in full.parameters():
        p.requires_grad_(True)
    torch.manual_seed(seed)
    splora = wrap(start, "splora", rank=SPLORA_RANK)
    torch.manual_seed(seed)
    sppara = wrap(start, "sppara")
    return OrderedDict(
        full_finetune=("full fine-tuning", full),
        splora=(f"SPLoRA r={SPLORA_RANK}", splora),
        sppara=("SPPaRA", sppara),
    )


def _evaluate(key: str, model: nn.Module, data: Split, before: dict[str, Tensor]) -> dict:
    result = {
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "learned_params": learned_parameters(model),
        "fuse_max_abs_diff": None,
        "frozen_unchanged": None,
        "frozen_tensors": 0,
    }
    if key != "full_finetune":
        result["fuse_max_abs_diff"] = fuse_max_diff(model, data.x_test)
        same, count = frozen_unchanged(model, before)
        result["frozen_unchanged"], result["frozen_tensors"] = same, count
        result["options"] = model.sparta_report.options
    return result


def run_demo(
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    console: Console | None = None,
) -> dict:
    """Run the demo, print a table, write ``results.json`` into ``out_dir`` (if given).

    Returns the results dict (the same content as the JSON file).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    console = console or Console()
    started = time.perf_counter()
    source, target = load_task(range(0, 5), seed), load_task(range(5, 10), seed)
    results = _header(seed, epochs, source, target)

    # fork_rng: seeding here leaves the caller's global RNG state as it was.
    with torch.random.fork_rng(devices=[]), _threads(DEMO_THREADS), _progress(console) as progress:
        torch.manual_seed(seed)
        base = small_cnn(num_classes=5)
        task = progress.add_task("pretrain on digits 0-4", total=epochs, loss="-")
        results["source"] = train(base, source, epochs, seed, progress, task)
        results["source"]["test_accuracy"] = accuracy(base, source.x_test, source.y_test)

        start = copy.deepcopy(base)
        torch.manual_seed(seed + 1)
        start.head = nn.Linear(start.head.in_features, 5)  # fresh head for digits 5-9
        before = {n: p.detach().clone() for n, p in start.named_parameters()}
        for key, (label, model) in _methods(start, seed).items():
            task = progress.add_task(f"{label} on digits 5-9", total=epochs, loss="-")
            timing = train(model, target, epochs, seed, progress, task)
            results["methods"][key] = {"label": label, **timing}
            results["methods"][key].update(_evaluate(key, model, target, before))

    _add_ratios(results)
    results["wall_time_s"] = time.perf_counter() - started
    console.print(results_table(results))
    for line in summary_lines(results):
        console.print(line, markup=False, highlight=False)
    if out_dir is not None:
        path = write_json(results, Path(out_dir) / "results.json")
        console.print(f"results written to {path}")
    return results


def _header(seed: int, epochs: int, source: Split, target: Split) -> dict:
    return {
        "sparta_version": __version__,
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "threads": DEMO_THREADS,
        "seed": seed,
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "optimiser": f"Adam lr={LEARNING_RATE}",
        "data": {
            "dataset": "sklearn.datasets.load_digits (8x8)",
            "source_classes": list(range(0, 5)),
            "target_classes": list(range(5, 10)),
            "source_train": len(source.y_train),
            "source_test": len(source.y_test),
            "target_train": len(target.y_train),
            "target_test": len(target.y_test),
        },
        "methods": {},
    }


@contextmanager
def _threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _add_ratios(results: dict) -> None:
    full = results["methods"]["full_finetune"]["learned_params"]
    for method in results["methods"].values():
        method["params_vs_full"] = method["learned_params"] / full


def results_table(results: dict) -> Table:
    """The demo's summary as a rich table."""
    table = Table(title="digits 5-9, learned on a base pretrained on digits 0-4")
    for name in ("method", "test acc", "learned params", "vs full FT", "ms/step", "fuse diff"):
        left = name == "method"
        table.add_column(name, justify="left" if left else "right", no_wrap=left)
    for m in results["methods"].values():
        diff = m["fuse_max_abs_diff"]
        table.add_row(
            m["label"],
            f"{m['test_accuracy']:.1%}",
            f"{m['learned_params']:,}",
            f"{m['params_vs_full']:.1%}",
            f"{m['ms_per_step']:.2f}",
            "-" if diff is None else f"{diff:.1e}",
        )
    return table


def summary_lines(results: dict) -> list[str]:
    """What the table does not show: setup, source accuracy and the frozen-base check."""
    intact = ", ".join(
        f"{m['label']} {'yes' if m['frozen_unchanged'] else 'NO'} ({m['frozen_tensors']} tensors)"
        for m in results["methods"].values()
        if m["frozen_unchanged"] is not None
    )
    return [
        f"source task (digits 0-4) test accuracy: {results['source']['test_accuracy']:.1%}",
        f"seed {results['seed']}, {results['epochs']} epochs, {results['optimiser']}, "
        f"batch {results['batch_size']}, {results['threads']} CPU thread(s), same data order",
        "fuse diff: max |adapted - sparta.fuse(adapted)| on the test set, eval mode",
        f"frozen base tensors bit-identical after training: {intact}",
        f"wall time {results['wall_time_s']:.1f} s",
    ]


def write_json(data: dict, path: Path) -> Path:
    """Write ``data`` as JSON atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
