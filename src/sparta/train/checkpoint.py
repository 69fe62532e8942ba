"""Atomic run checkpoints and random-number-generator states.

A checkpoint is a plain dictionary of tensors, numbers, text, lists and dictionaries written with
``torch.save`` (our own files only) and read back with ``torch.load(weights_only=True)``, which
refuses anything that would need unpickling of arbitrary objects. Writing goes to a temporary
file in the same folder, is flushed and fsync'ed, then renamed over the old checkpoint: a run
killed at any moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
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


def check_same_run(config: RunConfig, saved: dict) -> None:
    """Refuse a checkpoint of another config; a key the checkpoint lacks (written before the
    field existed) reads as that field's default."""
    now = config.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    saved = {**defaults, **saved}
    changed = sorted(
        k
        for k in set(now) | set(saved)
        if k not in RESUMABLE_CHANGES and now.get(k) != saved.get(k)
    )
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise ConfigError(
            f"cannot resume: the checkpoint was written by a different config ({diffs}); "
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
