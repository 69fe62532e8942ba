"""Atomic run checkpoints and random-number-generator states.

A checkpoint is a plain dictionary of tensors, numbers, text, lists and dictionaries written with
``torch.save`` (our own files only) and read back with ``torch.load(weights_only=True)``, which
refuses anything that would need unpickling of arbitrary objects. Writing goes to a temporary
file in the same folder, is flushed and fsync'ed, then renamed over the old checkpoint: a run
killed at any moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import GRID_KEYS, RunConfig
from ..errors import ConfigError
from ..io import atomic_write

FORMAT = "sparta.checkpoint"
VERSION = 1
#: Config keys that may change between a run and its resumption (they do not change results).
RESUMABLE_CHANGES = ("output_dir", "device", "workers", "find_unused_parameters")


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    path = Path(path)
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors land on the CPU)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch reports damage and unsafe content with several types
        raise ConfigError(f"cannot read checkpoint {str(path)!r}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not a sparta run checkpoint")
    if state.get("version") != VERSION:
        raise ConfigError(
            f"checkpoint {str(path)!r} has version {state.get('version')!r}; "
            f"this sparta reads version {VERSION}"
        )
    return state


def config_changes(saved: dict, now: dict) -> dict[str, tuple]:
    """``{key: (saved value, new value)}`` for every key that differs and changes results
    (not in :data:`RESUMABLE_CHANGES`); a key ``saved`` lacks (written before the field
    existed) reads as that field's default. Works for a run's and for a grid's dict."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    saved = {**defaults, **saved}
    keys = sorted(k for k in set(now) | set(saved) if k not in RESUMABLE_CHANGES)
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def check_same_run(config: RunConfig, saved: dict, what: str = "the checkpoint") -> None:
    """Refuse a checkpoint (or, ``what`` says, a finished run's result) of another config (see
    :func:`config_changes`)."""
    changed = config_changes(saved, config.to_dict())
    if changed:
        diffs = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:5])
        raise ConfigError(
            f"cannot resume: {what} was written by a different config ({diffs}); "
            "resume with the same config or start afresh without resume"
        )


# -- random number generators ----------------------------------------------------------------------
def rng_state() -> dict:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) global generators, in types
    that ``weights_only`` loading accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _tuples(value):
    """Python's generator state is a tuple of tuples; a round trip may give lists."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


# -- what a run folder holds ----------------------------------------------------------------------
#: The file in which ``sparta run`` records a run's (or a grid's) full config as it starts, so
#: that ``sparta run --output-dir DIR --resume`` needs nothing else.
RUN_CONFIG = "config.json"


@dataclass
class SavedRun:
    """The run (or grid) found in a folder: its config as saved, what state it is in
    (``"finished"``, ``"interrupted"``: a checkpoint and no result, ``"started"``: only its
    config, ``"grid"``: the parent folder of a grid) and the file the config came from."""

    config: dict
    state: str
    source: Path

    @property
    def name(self) -> str:
        """The run's name (a grid: its folder's name)."""
        if self.state == "grid":
            return self.source.parent.name
        return RunConfig.from_dict(self.config).name


def write_run_config(out, config: dict) -> Path:
    """Record ``config`` (a run's or a grid's ``to_dict()``) in ``out/config.json``,
    atomically."""
    with atomic_write(Path(out) / RUN_CONFIG, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return Path(out) / RUN_CONFIG


def saved_run(out) -> SavedRun | None:
    """The run recorded in folder ``out`` (``None``: no config.json, checkpoint or result).
    The config comes from ``result.json``, else the checkpoint, else ``config.json``."""
    from .records import CHECKPOINT, RESULT

    out = Path(out)
    files = {name: out / name for name in (RUN_CONFIG, RESULT, CHECKPOINT)}
    present = {name: path for name, path in files.items() if path.is_file()}
    if not present:
        return None
    if RESULT in present:
        state = "finished"
    elif CHECKPOINT in present:
        state = "interrupted"
    else:
        state = "started"
    # What ran wins over what was about to run: a config.json written for a new run that
    # failed before its first checkpoint does not rename the finished run still there.
    for name in (RESULT, CHECKPOINT, RUN_CONFIG):
        if name in present:
            config = _config_in(present[name])
            grid = name == RUN_CONFIG and any(k in config for k in GRID_KEYS)
            return SavedRun(config, "grid" if grid else state, present[name])
    return None  # unreachable: present is not empty


def _config_in(path: Path) -> dict:
    """The config dict recorded in ``path`` (config.json, result.json or a checkpoint)."""
    if path.suffix == ".pt":
        config = load_checkpoint(path).get("config")
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {str(path)!r}: {exc}") from None
        config = data.get("config", data) if path.name != RUN_CONFIG else data
    if not isinstance(config, dict):
        raise ConfigError(f"{str(path)!r} records no run config (got {type(config).__name__})")
    return config
