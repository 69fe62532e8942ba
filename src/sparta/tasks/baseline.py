"""Baselines as task files: a fine-tuned or fine-pruned model saved as its compact model.

The paper's baselines (full fine-tuning, fine-pruning) train every weight of a plain model, so
there is nothing to share with a base but its structure. :func:`export_baseline` stores such a
model in the task format (:mod:`.artifact`): every trained tensor, kept entries only (the
masks select them, exactly as for an adapter task's norms and head), the BatchNorm statistics,
and the compact plan (:mod:`.plan`: per layer of the base architecture, the kept output and
input indices). The manifest's ``adapter`` is the method's name (``finetune`` or
``fine-pruning``, :data:`.manifest.BASELINES`) with no options and no adapted layers, and its
base fingerprint covers the structure only (no frozen tensor remains). So a baseline file is a
safetensors state dict plus the recorded structure as JSON, read without unpickling and checked
like any task file; ``sparta.build(base, task)`` builds the compact model on any model of the
same architecture (the base's weights are not used), and ``TaskBank``, ``sparta eval``,
``sparta bench`` and ``sparta tasks add`` take it as they take an adapter's task.

    model = torchvision.models.resnet18(num_classes=10)      # train every weight, then prune
    sparta.Pruner(model, x, criterion="l1", target="density=0.3").step()
    task = export_baseline(model, "fine-pruning", x)
    task.save("fp.safetensors")
    compact = sparta.build(torchvision.models.resnet18(num_classes=10), task)   # == model(x)
"""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import ConfigError
from ..heads import static_head
from .artifact import Task, _is_wrapped, export_layout, with_plan
from .make_plan import plan_of
from .manifest import BASELINES, ArtifactError


def is_baseline(task: Task) -> bool:
    """Whether ``task`` is a baseline (a plain model's every trained tensor), not an adapter's."""
    m = task.manifest
    return m["adapter"]["name"] in BASELINES and not m["adapted"]


def export_baseline(model: nn.Module, method: str, example_inputs=None) -> Task:
    """The task of a plain, fully trained (and possibly fine-pruned) ``model``: see the module
    docstring. ``method`` is ``"finetune"`` or ``"fine-pruning"``; ``example_inputs`` (a batch
    the model takes) records the input shapes, by default those the ``Pruner`` recorded.

    Raises :class:`ArtifactError` if the model's compact form cannot be recorded as a plan (a
    baseline file must build without tracing, as it holds no adapter to re-wrap)."""
    if method not in BASELINES:
        raise ConfigError(f"a baseline's method is one of {list(BASELINES)}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_baseline expects a torch model, got {type(model).__name__}")
    if _is_wrapped(model):
        raise ConfigError(
            "export_baseline expects a plain model (fine-tuned or fine-pruned); a model from "
            "sparta.wrap is exported with sparta.export"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model trains no parameter: a baseline stores what it trained")
    adapter = {"name": method, "options": {}}
    task = export_layout(model, adapter, [], static_head(model), example_inputs)
    with warnings.catch_warnings(record=True) as caught:  # its "will trace" does not apply
        warnings.simplefilter("always")
        task = with_plan(task, plan_of(model, task))
    if task.plan is None:
        why = next((str(w.message) for w in caught), "") or "no input shapes recorded"
        raise ArtifactError(
            f"the baseline's compact form cannot be recorded as a plan ({why[:300]}); a "
            "baseline file must build without tracing"
            + (": pass example_inputs=<a batch>" if "inputs" not in task.manifest else "")
        )
    for w in caught:  # anything else is the caller's to see
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return task


def save_baseline(model: nn.Module, path, method: str, example_inputs=None) -> dict:
    """Write the baseline task of ``model`` to ``path`` (atomically); ``{"task_bytes": size}``.

    A model whose compact form no plan can express (rare: a layer only torch-pruning's traced
    graph cuts) is not written: a warning says why and ``{"checkpoint_bytes": n}`` gives the
    size its whole state dict would take, so the run still finishes with its results."""
    try:
        task = export_baseline(model, method, example_inputs)
    except ArtifactError as exc:
        warnings.warn(f"{method} run: no compact model file written ({exc})", stacklevel=2)
        state = model.state_dict()
        return {"checkpoint_bytes": sum(t.numel() * t.element_size() for t in state.values())}
    return {"task_bytes": task.save(path)}
