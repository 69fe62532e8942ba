"""A task's compact model against its base: parameters, MACs and latency, side by side."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from torch import nn

from ..errors import ConfigError, UnknownNameError
from ..inputs import make_inputs
from ..measure import MacCounter, latency
from ..runtime import RUNTIMES, deploy


def task_batch(task, batch_size: int, image_size: int | None = None, device=None):
    """An example batch of the shapes the task recorded (a tensor, or a dict / tuple of them
    such as token ids and attention masks), with ``batch_size`` examples and (for image
    inputs) ``image_size`` sides, on ``device``."""
    spec = copy.deepcopy(task.manifest.get("inputs"))
    if not spec:
        raise ConfigError("the task records no input shape to benchmark with")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    leaves = _leaf_specs(spec)
    for leaf in leaves:
        leaf["shape"][0] = batch_size
    shape = leaves[0]["shape"]
    if image_size is not None:
        if len(leaves) != 1 or len(shape) != 4 or image_size < 1:
            raise ConfigError("--image-size needs image inputs (N, C, H, W) and a size >= 1")
        shape[2] = shape[3] = image_size
    return make_inputs(spec, device=device)


def _leaf_specs(spec) -> list[dict]:
    """The ``{"shape", "dtype"}`` entries of an input spec (see :mod:`sparta.inputs`)."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"the task's recorded inputs are not an input spec: {spec!r:.80}")
    ((kind, value),) = spec.items()
    if kind == "tensor":
        return [value]
    parts = value.values() if kind == "dict" else value
    return [leaf for part in parts for leaf in _leaf_specs(part)]


def input_shapes(inputs):
    """The shape of a batch as JSON data: a list for a tensor, a dict or list of them for a
    dict or tuple of tensors (token ids and attention masks)."""
    if isinstance(inputs, dict):
        return {k: input_shapes(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return [input_shapes(v) for v in inputs]
    return list(inputs.shape)


def parameters(model: nn.Module) -> int:
    """Every parameter of ``model``, learned or frozen."""
    return sum(p.numel() for p in model.parameters())


def compare(
    base: nn.Module,
    compact: nn.Module,
    inputs,
    repeats: int = 50,
    warmup: int = 5,
    progress: Callable[[Iterable], Iterable] | None = None,
    runtime: str = "eager",
) -> dict:
    """Parameters, MACs and median latency (:func:`sparta.measure.latency`: the two models
    timed in turn) of ``base`` and ``compact`` on ``inputs``, and the speed-up.

    ``runtime="eager"`` times the models as they are; ``"torchscript"`` or ``"onnxruntime"``
    first serves each through :func:`sparta.runtime.deploy` (checked against the model on
    ``inputs``) and times that. Parameters and MACs are the models' own in every runtime."""
    if runtime not in RUNTIMES:
        raise UnknownNameError("runtime", runtime, RUNTIMES)
    models = {"base": base, "compact": compact}
    macs = {name: MacCounter(net, inputs).count(net) for name, net in models.items()}
    timed = models
    if runtime != "eager":
        timed = {name: deploy(net, inputs, runtime=runtime) for name, net in models.items()}
    seconds = latency(timed, inputs, repeats, warmup, progress=progress)
    return {
        "runtime": runtime,
        "params": {name: parameters(net) for name, net in models.items()},
        "macs": macs,
        "latency_ms": {name: 1000 * s for name, s in seconds.items()},
        "speedup": seconds["base"] / max(seconds["compact"], 1e-12),
    }
