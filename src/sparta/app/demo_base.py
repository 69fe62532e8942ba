"""The demo's base: ``digits_cnn`` pretrained on digits 0-4 with the runner, cached as a
safetensors state dict (written atomically, read back without unpickling, checked against its
key and the architecture). See :mod:`sparta.app.demo`."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write

CACHE_FORMAT = "sparta.demo.base/1"
#: How the toy's base is pretrained on digits 0-4 (unchanged since the first demo, so that cached
#: bases stay valid; the target-task runs use the paper recipe, see :mod:`sparta.app.demo`).
PRETRAIN_BATCH_SIZE = 32
PRETRAIN_OPTIMIZER = "adam"
PRETRAIN_LR = 3e-3
#: Config keys that do not change the trained weights.
NOT_IN_KEY = ("output_dir", "device", "workers")


def pretrain_config(seed: int, epochs: int, output_dir: str | Path):
    """The runner config that pretrains the base on the source task (also the cache key)."""
    from ..config import RunConfig

    return RunConfig(
        model="digits_cnn",
        dataset="digits-source",
        method="finetune",
        steps=0,
        epochs=epochs,
        batch_size=PRETRAIN_BATCH_SIZE,
        optimizer=PRETRAIN_OPTIMIZER,
        lr=PRETRAIN_LR,
        seed=seed,
        device="cpu",
        output_dir=str(output_dir),
    )


def cache_key(config) -> dict:
    """Everything the pretrained base depends on: the runner config less its paths."""
    data = config.to_dict()
    for k in NOT_IN_KEY:
        data.pop(k)
    return {"format": CACHE_FORMAT, **data}


def cache_path(cache: Path, config) -> Path:
    """``<cache>/digits_cnn-source-s<seed>-e<epochs>-<digest of the key>.safetensors``."""
    text = json.dumps(cache_key(config), sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return Path(cache) / f"digits_cnn-source-s{config.seed}-e{config.epochs}-{digest}.safetensors"


def pretrained_base(source, config, cache: Path | None):
    """``(model, info)``: ``digits_cnn`` trained by ``sparta.train.run(config)`` on ``source``,
    or read from the cache folder if a valid file is there (and cached after training)."""
    from ..train import run

    info: dict = {"cache_file": None, "cache_hit": False}
    model = fresh_digits_cnn(source.num_classes)
    path = cache_path(cache, config) if cache is not None else None
    if path is not None:
        info["cache_file"] = str(path)
        state, reason = read_cached_base(path, cache_key(config), model)
        if state is not None:
            model.load_state_dict(state)
            info["cache_hit"] = True
        elif reason:
            info["cache_rejected"] = reason
    if not info["cache_hit"]:
        t0 = time.perf_counter()
        model = run(config, datasets=source, progress=False).model
        info["train_s"] = round(time.perf_counter() - t0, 2)
        if path is not None:
            write_cached_base(path, model, cache_key(config))
    x, y = source.test.tensors
    info["source_test_accuracy"] = accuracy(model, x, y)
    info["params"] = sum(p.numel() for p in model.parameters())
    return model.eval(), info


def fresh_digits_cnn(num_classes: int) -> nn.Module:
    from ..models import create

    return create("digits_cnn", num_classes=num_classes)


def write_cached_base(path: Path, model: nn.Module, key: dict) -> None:
    """The model's state dict as safetensors with ``key`` in its metadata, written atomically
    (a temporary file in the same folder, fsync, rename)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_write(path) as f:
        f.write(save(state, metadata={"key": json.dumps(key, sort_keys=True)}))


def read_cached_base(path: Path, key: dict, model: nn.Module) -> tuple[dict | None, str | None]:
    """``(state dict, None)`` if ``path`` holds a valid base for ``key`` and ``model``'s
    architecture; ``(None, reason)`` if it is there but unusable; ``(None, None)`` if absent.
    Read with safetensors: nothing is unpickled."""
    from safetensors import safe_open

    if not path.is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # a truncated or foreign file
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    if meta.get("key") != json.dumps(key, sort_keys=True):
        return None, "written for other settings"
    want = model.state_dict()
    if set(state) != set(want):
        return None, "tensor names differ from digits_cnn's"
    for k, v in want.items():
        if state[k].shape != v.shape or state[k].dtype != v.dtype:
            return None, f"tensor {k!r} has the wrong shape or dtype"
        if v.is_floating_point() and not torch.isfinite(state[k]).all():
            return None, f"tensor {k!r} holds non-finite values"
    return state, None


def target_base(pretrained: nn.Module, seed: int, num_classes: int = 5) -> nn.Module:
    """A copy of the pretrained base with a fresh head (seeded) for the target task; frozen,
    in eval mode. This is the base every method and the TaskBank share."""
    base = copy.deepcopy(pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        base.head = nn.Linear(base.head.in_features, num_classes)
    for p in base.parameters():
        p.requires_grad_(False)
    return base.eval()


def accuracy(model: nn.Module, x, y) -> float:
    """Top-1 accuracy of ``model`` (set to eval mode) on the tensors ``x``, ``y``."""
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())
