"""A task's compact model against its base: parameters, MACs and latency, side by side."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from torch import nn

from ..errors import ConfigError, UnknownNameError
from ..inputs import make_inputs
from ..measure import MacCounter, latency
from ..runtime import RUNTIMES, deploy


def task_batch(task, batch_size: int, image_size: int | None = None):
    """An example batch of the shape the task recorded, with ``batch_size`` examples and
    (for image inputs) ``image_size`` sides."""
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
