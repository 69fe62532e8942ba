"""Rebuilding the shared base a task was trained on, from what its run or its bank recorded.

A task file does not carry its base: deploying it (``sparta eval``, ``sparta bench``,
``sparta tasks ...``) rebuilds the base from the model options (:class:`BaseSpec`). Options
given explicitly win; the rest default to the config in the run folder's ``result.json`` next
to the task, or, for a bank, to the base its ``bank.json`` records (written at the first add).
The base's fingerprint is then checked against each task's, so a different base is refused.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torch import nn

from ..config import BASELINE_METHODS
from ..errors import ConfigError
from ..io import atomic_write
from ..tasks import Task, TaskBank
from .checkpoint import seed_everything
from .records import RESULT, TASK

#: The file of a bank's folder that records its base options.
BANK_FILE = "bank.json"


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
        from ..models import create  # torchvision: imported only when a base is built

        seed_everything(self.seed)
        model = create(
            self.model,
            num_classes=self.num_classes,
            weights=self.weights,
            checkpoint=self.checkpoint,
            cifar_stem=self.cifar_stem,
        )
        return model.eval()


def resolve_base(defaults: dict, options: dict, task=None) -> BaseSpec:
    """The :class:`BaseSpec` of ``options`` (the fields of :class:`BaseSpec`; ``None``: not
    given) over ``defaults`` (a run's config or a bank's record); without either, the head
    size is that of ``task``'s head."""
    unknown = set(options) - {f.name for f in fields(BaseSpec)}
    if unknown:
        raise ConfigError(f"unknown base options {sorted(unknown)}; known: {_names()}")
    merged = {k: v for k, v in defaults.items() if k in _names() and v is not None}
    merged.update({k: v for k, v in options.items() if v is not None})
    if merged.get("model") is None:
        raise ConfigError(
            "--model is required (no result.json next to the task to take the run's model from)"
        )
    if merged.get("num_classes") is None and task is not None:
        merged["num_classes"] = head_classes(task)
    merged["cifar_stem"] = bool(merged.get("cifar_stem"))
    merged["seed"] = int(merged.get("seed", 0))
    return BaseSpec(**merged)


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


def _names() -> list[str]:
    return [f.name for f in fields(BaseSpec)]


# -- a run folder ----------------------------------------------------------------------------------
def find_task(path) -> Path:
    """A task file, or the ``task.safetensors`` of a run folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / TASK).is_file():
            method = run_config(path / TASK).get("method")
            why = (
                f" (a {method} run written before sparta saved baselines' compact models: run "
                "it again to get one)"
                if method in BASELINE_METHODS and (path / RESULT).is_file()
                else ""
            )
            raise ConfigError(f"folder {str(path)!r} holds no {TASK}{why}")
        return path / TASK
    if not path.is_file():
        raise ConfigError(f"no such task file: {str(path)!r}")
    return path


def run_result(task_file: Path) -> dict:
    """The ``result.json`` of the run whose folder holds ``task_file`` (``{}`` if there is
    none; an unreadable one is ignored with a warning)."""
    path = Path(task_file).parent / RESULT
    if not path.is_file():
        return {}
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(result, dict):
            raise ValueError("not a JSON object")
        return result
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring unreadable {str(path)!r} ({err})", UserWarning, stacklevel=2)
        return {}


def run_config(task_file: Path) -> dict:
    """The config of the run whose folder holds ``task_file`` (``{}`` if there is none)."""
    config = run_result(task_file).get("config")
    return dict(config) if isinstance(config, dict) else {}


def run_accuracy(task_file: Path) -> float | None:
    """The final test accuracy the run recorded (``None`` without a readable result)."""
    final = run_result(task_file).get("final")
    return final.get("accuracy") if isinstance(final, dict) else None


# -- a bank's base -------------------------------------------------------------------------------
def saved_base(directory: Path) -> dict:
    """The base options recorded in a bank's ``bank.json`` (``{}`` if it has none)."""
    path = Path(directory) / BANK_FILE
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
    return {key: value for key, value in saved.items() if key in _names()}


def remember_base(directory: Path, spec: BaseSpec) -> bool:
    """Record ``spec`` as the bank's base in its ``bank.json`` (atomically), unless one is
    recorded already; whether it wrote."""
    path = Path(directory) / BANK_FILE
    if path.is_file():
        return False
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump({"base": asdict(spec)}, f, indent=2)
        f.write("\n")
    return True


def bank_base(directory: Path, options: dict, task=None) -> BaseSpec:
    """The base of a bank: ``options`` over its ``bank.json``; the head size defaults to the
    recorded one, else to that of ``task`` or of the bank's first readable task."""
    directory = Path(directory)
    saved = saved_base(directory)
    if options.get("model") is None and not saved:
        raise ConfigError(
            f"--model is required: {str(directory)!r} has no {BANK_FILE} yet (the first "
            "`sparta tasks add` records the base options there)"
        )
    classes = options.get("num_classes")
    if classes is None:
        classes = saved.get("num_classes")
    if classes is None and task is None and directory.is_dir():
        for path in sorted(directory.glob("*.safetensors")):  # the first readable one
            try:
                task = Task.load(path)
                break
            except ConfigError:
                continue  # an unusable file: TaskBank lists it with its error
    return resolve_base(saved, {**options, "num_classes": classes}, task)


def open_bank(directory: Path, options: dict, task=None):
    """``(TaskBank(base, directory), spec)`` with the base rebuilt from ``options`` over the
    bank's ``bank.json`` (see :func:`bank_base`)."""
    spec = bank_base(directory, options, task)
    return TaskBank(spec.create(), directory), spec
