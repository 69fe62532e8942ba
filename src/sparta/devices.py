"""Devices and autocast: the one place sparta reads them.

Every tensor sparta creates follows the model it belongs to: adapters and masks take their
layer's device and dtype, example inputs made from a recorded spec go to the model's device
(:func:`module_device`), and CPU index tensors are moved to the tensor they select from
(``index_select`` needs both on one device; plain ``t[index]`` does not). Scores are CPU
float32 bookkeeping. Under ``torch.autocast`` the adapters' own arithmetic runs in the
parameters' dtype (:func:`autocast_off`) and layer calls in the autocast dtype
(:func:`autocast_dtype`), as a plain layer's would. ``benchmarks/device_check.py`` runs the
whole loop on a GPU when one is lent.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else buffer); the CPU if it has none."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs linear and convolution layers in on ``device``, or
    ``None`` when autocast is off for that device type."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which ops on ``device`` run in the dtypes of their tensors: the adapter's
    own arithmetic (``W + delta``, masks) stays in the parameters' precision under autocast,
    so the fused, cached and training weights are the same numbers with or without it."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
