"""Small helpers shared across sparta."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

#: Norm layers: a task learns their affine parameters (paper: "plus every norm layer's
#: affine"), and pruning masks their channels with the layer that feeds them.
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def call(model: nn.Module, inputs):
    """``model(inputs)``, spreading a tuple/list as positional and a dict as keyword arguments."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def batch_size(inputs) -> int:
    """Leading dimension of the first tensor in ``inputs``."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, dict) else inputs
    for v in values:
        if isinstance(v, Tensor) and v.dim():
            return int(v.shape[0])
    return 1


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the duration (restored after, if it was
    on). For short bursts that create thousands of small objects (a task switch): a collection
    inside one walks every live object, a model's included, and costs more than the burst."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration (so measuring passes never touch BatchNorm statistics),
    then every module's own training flag restored."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, flag in flags.items():
            m.training = flag
