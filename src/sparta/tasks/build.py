"""``sparta.build(base, task)``: a task's deployable model, compact and fused, in one call.

A version 3 task carries its compact plan (:mod:`.plan`): check the base's fingerprint, then
slice the base's tensors as the plan says with the adapters fused in (:mod:`.from_plan`): no
wrap, no task model, no graph trace. Older tasks (and those exported without a plan) take the
graph path: rebuild the masked task model on the base, trace its coupled channel groups, bake
the adapters into the weights and cut every dead channel (``build_compact``). What depends on
the base alone (its tensor digests, modules, groups) is computed once per :class:`Builder` and
reused for every task, which is what makes switching tasks in a :class:`~sparta.TaskBank`
cheap.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from ..devices import module_device
from ..errors import ConfigError, SpartaError
from ..inputs import check_nonempty, input_spec, make_inputs
from ..pruning.groups import Group, find_groups
from ..utils import call, gc_paused
from .apply import _load as load_task
from .apply import storages, task_model
from .artifact import Task
from .compact import CompactReport, build_compact
from .compact_checks import _output
from .fingerprint import _combine, _is_wrapped, base_digests
from .from_plan import PlanBuilder, skeleton
from .plan import compare_check
from .taskfile import ArtifactError, check_manifest


class Builder:
    """Builds compact models of tasks on one ``base``, which it never changes.

    Per task layout it keeps one masked task model whose frozen weights alias the base's
    (``TEMPLATES`` of them at most): a task switch only loads the task's tensors into it and
    fills a fresh structure copy of the base with the fused kept weights.

    Args:
        base: the plain base model the tasks were trained on.
        example_inputs: a batch the base accepts; by default the shapes recorded in each task
            (present when the task was pruned with :class:`~sparta.Pruner`) are used.
    """

    TEMPLATES = 2

    def __init__(self, base: nn.Module, example_inputs=None):
        if not isinstance(base, nn.Module):
            raise TypeError(f"expected the base model (torch.nn.Module), got {type(base).__name__}")
        if _is_wrapped(base):
            raise ConfigError("expected the plain base model, not a wrapped one")
        self.base = base
        self.example_inputs = example_inputs
        self._digests: dict[str, str] | None = None
        self._groups: dict[str, list[Group]] = {}
        self._templates: dict[str, tuple[nn.Module, dict]] = {}
        self._combined: dict[tuple, str] = {}
        self._protected: set[int] | None = None
        self._runs: set[str] = set()  # input specs the base is known to accept
        self._planner: PlanBuilder | None = None

    def check(self, task: Task) -> None:
        """Raise :class:`ArtifactError` unless ``task`` was trained on this base.

        The base's digests are computed on first use and cached: the base must not be edited
        in place afterwards (no sparta code does)."""
        if not isinstance(task, Task):
            raise TypeError(f"expected a sparta Task, got {type(task).__name__}")
        check_manifest(task.manifest, "<task>")  # a Task object may have been edited
        if self._digests is None:
            self._digests = base_digests(self.base)
        expected = task.manifest["base"]["tensors"]
        bad = [n for n in expected if self._digests.get(n) != expected[n]]
        names = tuple(sorted(expected))
        if names not in self._combined:  # the structure walk is the costly part: once
            self._combined[names] = _combine({n: self._digests.get(n) for n in names}, self.base)
        if bad or self._combined[names] != task.fingerprint:
            named = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ArtifactError(
                "base fingerprints differ: this task was trained on another base model"
                + (f" (tensors that differ: {named})" if bad else " (module structure differs)")
            )

    def inputs(self, task: Task):
        """The example batch for ``task``: the one given to the builder, else the task's.
        The base must run on it (checked once per input shapes)."""
        if self.example_inputs is not None:
            inputs, source = self.example_inputs, "example_inputs"
        else:
            spec = task.manifest.get("inputs")
            if spec is None:
                raise ConfigError(
                    "this task records no input shapes (it was exported without example_inputs "
                    "and never pruned with sparta.Pruner); pass example_inputs=<a batch>"
                )
            inputs = make_inputs(spec, device=module_device(self.base))
            source = "the input shapes the task records"
        self._check_runs(inputs, source)
        return inputs

    def _check_runs(self, inputs, source: str) -> None:
        """Run the base once on ``inputs`` (eval mode, no gradients, flags restored) so that a
        batch it cannot take is one clear error, not a failure deep inside tracing."""
        spec = input_spec(inputs)
        check_nonempty(inputs, source)  # a batch of 0 has no outputs to compare
        key = json.dumps(spec, sort_keys=True)
        if key in self._runs:
            return
        flags = {m: m.training for m in self.base.modules()}
        self.base.eval()
        try:
            with torch.no_grad():
                call(self.base, inputs)
        except SpartaError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"the base model cannot run on {source} ({_describe(spec)}): "
                f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}; pass "
                "example_inputs=<a batch the base accepts>"
            ) from exc
        finally:
            for m, flag in flags.items():
                m.training = flag
        self._runs.add(key)

    def groups(self, task: Task, example_inputs, masked: nn.Module | None = None) -> list[Group]:
        """The coupled channel groups of the task's model (cached per input shape, head and
        task layout). Traced on the masked task model, not on the plain base: a layer the task
        adapts (e.g. a weight-standardising conv) can be cut where the same plain layer
        could not, so the groups are those the Pruner saw."""
        m = task.manifest
        layout = [m["adapter"], sorted(m["adapted"])]
        key = json.dumps([input_spec(example_inputs), sorted(m["head"]), layout], default=str)
        if key not in self._groups:
            model = self.task_model(task) if masked is None else masked
            self._groups[key], _ = find_groups(model, example_inputs, set(m["head"]))
        return self._groups[key]

    def task_model(self, task: Task) -> nn.Module:
        """The masked task model on the base, for building only (never train it): one per
        task layout (adapter, options, adapted, head and masked layers, stored tensors),
        reused by loading each task's tensors into it (a refused task writes nothing into
        it). The stored tensors are part of the layout: a task that does not store some
        trainable tensor must find the base's value there, not another task's."""
        m = task.manifest
        key = json.dumps(
            [m["adapter"], *(sorted(m[k]) for k in ("adapted", "head", "masked", "tensors"))],
            sort_keys=True,
        )
        if self._protected is None:
            self._protected = storages(self.base)
        model, cache = self._templates.pop(key, (None, {}))
        if model is None:
            model = task_model(self.base, task, share_frozen=True, protected=self._protected)
            model.eval()
        else:
            load_task(model, task, cache, protected=self._protected)
        self._templates[key] = model, cache  # most recently used last
        self._structure = cache.setdefault("structure", {})
        while len(self._templates) > self.TEMPLATES:
            self._templates.pop(next(iter(self._templates)))
        return model

    def build(self, task: Task, verify: bool = True) -> tuple[nn.Module, CompactReport]:
        """``(compact model, report)`` for ``task``; see :func:`build`. The garbage collector
        is paused for a build from a plan (:func:`~sparta.utils.gc_paused`), verify included."""
        if not isinstance(task, Task) or task.plan is None:  # (check says what is wrong)
            return self._build(task, verify)
        with gc_paused():
            return self._build(task, verify)

    def _build(self, task: Task, verify: bool) -> tuple[nn.Module, CompactReport]:
        self.check(task)
        if self._protected is None:
            self._protected = storages(self.base)
        if task.plan is not None:
            model, report = self._from_plan(task, verify)
        else:
            model, report = self._from_graph(task, verify)
        if _storages(model) & self._protected:  # never expected: the last line of defence
            raise SpartaError("the compact model shares storage with the base; refused")
        return model, report

    def _from_plan(self, task: Task, verify: bool) -> tuple[nn.Module, CompactReport]:
        """A version 3 task: slices of the base as its plan says (no wrap, no trace); with
        ``verify``, one forward on the probe inputs against the output recorded at export."""
        if self.example_inputs is not None:  # not needed here, but must be a batch it takes
            self._check_runs(self.example_inputs, "example_inputs")
        spec = task.manifest.get("inputs")
        if verify and spec is None:  # nothing recorded to check on: check on the masked model
            if self.example_inputs is None:
                raise ConfigError(
                    "this task records no input shapes to verify its compact plan on; pass "
                    "example_inputs=<a batch> (checked against the masked task model) or "
                    "verify=False"
                )
            return self._from_graph(task, verify)
        if self._planner is None:
            self._planner = PlanBuilder(self.base)
        model, report = self._planner.build(task)
        if verify:
            inputs = make_inputs(spec, seed=0, device=module_device(self.base))
            self._check_runs(inputs, "the input shapes the task records")
            try:
                out = _output(model, inputs)
            except Exception as exc:  # the base runs on them: the plan does not fit the base
                raise ArtifactError(
                    f"the compact model built from the task's plan cannot run on the task's "
                    f"probe inputs ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                    "the plan does not fit this base"
                ) from exc
            compare_check(task.plan["check"], out)
        return model, report

    def _from_graph(self, task: Task, verify: bool) -> tuple[nn.Module, CompactReport]:
        """An older task (no plan): the masked task model, its traced groups, then the cut."""
        inputs = self.inputs(task)
        masked = self.task_model(task)
        groups = self.groups(task, inputs, masked)
        structure = self._structure.setdefault(id(groups), {})
        return build_compact(
            masked, groups, inputs, verify, skeleton=skeleton(self.base), structure=structure
        )


def build(base: nn.Module, task: Task, example_inputs=None, verify: bool = True) -> nn.Module:
    """The compact model of ``task`` on ``base``: plain torch modules, adapters fused into the
    kept weights, every pruned channel physically removed (with every coupled layer).

    ``base`` is never changed and shares no storage with the result. With ``verify`` (the
    default) the compact model's outputs are checked (eval mode; a difference above 1e-4
    relative raises): for a task with a plan (format 3), one forward on the recorded input
    shapes against the output stored when the task was exported, where the masked model was
    compared; for older tasks, against the masked task model on the example batch. The model is
    returned in eval mode; its ``sparta_compact`` attribute holds the
    :class:`~sparta.tasks.CompactReport`.
    """
    model, report = Builder(base, example_inputs).build(task, verify=verify)
    model.sparta_compact = report
    return model.eval()


def _storages(model: nn.Module) -> set[int]:
    """:func:`.apply.storages` of ``model`` in one walk of its modules' own tensor dicts (no
    generators of generators: it runs once per task switch)."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None and t.numel():
                    found.add(t.untyped_storage().data_ptr())
        stack.extend(m for m in module._modules.values() if m is not None)
    return found


def _describe(spec) -> str:
    if "tensor" in spec:
        return f"{spec['tensor']['dtype']} {spec['tensor']['shape']}"
    if "tuple" in spec:
        return "(" + ", ".join(_describe(x) for x in spec["tuple"]) + ")"
    return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in spec["dict"].items()) + "}"
