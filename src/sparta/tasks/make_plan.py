"""Record a task's compact plan at export, where the masked model and its groups exist.

The plan is derived from today's graph build (``build_compact``: groups traced with
torch-pruning, verified against the masked model), then checked: the plan's own build
(:mod:`.from_plan`, on the plain base inside the wrapped model) must have the graph build's
modules, tensor shapes and outputs. Only then is it recorded, with the compact model's output
on the probe inputs (:func:`.plan.output_check`). A model whose compact form the plan cannot
express (a layer only torch-pruning's tracer cuts, an attribute outside the whitelist) gets no
plan, with a warning; it still builds from the graph, as version 2 tasks do.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..adapters.layer import AdaptedLayer
from ..devices import module_device
from ..inputs import make_inputs
from ..pruning.groups import find_groups
from .compact import build_compact
from .compact_checks import _compare, _output
from .from_plan import PlanBuilder
from .plan import PLAN_ATTRS, WIDTH_ATTRS, encode_set, output_check
from .plan_job import _cut_widths


class PlanUnavailable(Exception):
    """The compact model cannot be expressed as a plan (the reason is the message)."""


def plan_of(model: nn.Module, task) -> dict | None:
    """The compact plan of wrapped ``model`` (whose :class:`Task` is ``task``), or ``None``
    with a warning when it cannot be made; ``None`` silently when the task records no input
    shapes (nothing to trace or check on: such a task builds as before, from example_inputs)."""
    spec = task.manifest.get("inputs")
    if spec is None:
        return None
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _make(model, task, make_inputs(spec, seed=0, device=module_device(model)))
    except Exception as exc:  # the task is still complete: it builds from the graph instead
        why = str(exc) if isinstance(exc, PlanUnavailable) else f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"export: no compact plan recorded ({' '.join(why.split())[:300]}); "
            "sparta.build will trace the model's graph for this task, as for older task files",
            stacklevel=3,
        )
        return None
    finally:
        for m, flag in flags.items():
            m.training = flag


def _make(model: nn.Module, task, inputs) -> dict:
    groups, _ = find_groups(model, inputs, set(task.manifest["head"]))
    record: dict = {}
    graph, report = build_compact(model, groups, inputs, verify=True, record=record)
    if record["cuts"] is None:
        raise PlanUnavailable("some pruned layer is cut only by torch-pruning's traced graph")
    base = plain_base(model)
    modules = dict(base.named_modules())
    removed = _removed(record)
    sets, index, cuts = [], {}, {}
    for name in sorted({n for n, _ in removed}):
        widths = _cut_widths(modules.get(name))
        cut = [None, None]
        for dim in (0, 1):
            if (name, dim) not in removed:
                continue
            width = None if widths is None else widths[dim]
            if width is None:
                raise PlanUnavailable(
                    f"{name!r} loses entries on dim {dim}, which a plan cannot cut"
                )
            keep = torch.ones(width, dtype=torch.bool)
            keep[removed[(name, dim)]] = False
            entry = encode_set(keep.nonzero().flatten(), width)
            cut[dim] = index.setdefault(tuple(entry), len(sets))
            if cut[dim] == len(sets):
                sets.append(entry)
        cuts[name] = cut
    plan = {
        "sets": sets,
        "cuts": cuts,
        "attrs": _attr_changes(modules, graph, set(cuts)),
        "report": {
            "params_before": report.params_before,
            "params_after": report.params_after,
            "groups": [
                [g.name, g.kind, g.units, g.alive, g.removed, g.dense_reason] for g in report.groups
            ],
            "notes": list(report.notes),
        },
        "check": {},
    }
    trial = type(task)(task.tensors, {**task.manifest, "plan": plan})
    built, _ = PlanBuilder(base).build(trial, "<export>")
    _same_structure(built, graph)
    got = _output(built, inputs)
    _compare(_output(graph, inputs), got)
    plan["check"] = output_check(got)
    return plan


def _removed(record: dict) -> dict[tuple[str, int], Tensor]:
    """``{(layer, dim): removed indices}`` from what ``build_compact`` removed."""
    hits: dict[tuple[str, int], list[Tensor]] = {}
    for (name, site), idxs in record["cuts"].items():
        if len(idxs):
            hits.setdefault((name, 0 if site == "out" else 1), []).append(idxs)
    for group, units in record["sliced"]:
        for m in group.members:
            drop = m.idxs[torch.isin(m.units, units)]
            if len(drop):
                hits.setdefault((m.module, 0 if m.site == "out" else 1), []).append(drop)
    return {k: torch.cat(v).unique() for k, v in hits.items()}


def _attr_changes(base: dict[str, nn.Module], graph: nn.Module, cut: set[str]) -> dict:
    """The plain attributes the graph build changed, besides widths of cut layers; each must
    be one a plan may set (:data:`.plan.PLAN_ATTRS`)."""
    changes: dict[str, dict] = {}
    for name, module in graph.named_modules():
        old = base.get(name)
        if old is None:
            raise PlanUnavailable(f"the compact model has a module {name!r} the base has not")
        for attr, value in vars(module).items():
            if attr.startswith("_") or not isinstance(value, int | set | tuple):
                continue
            if vars(old).get(attr) == value or (attr in WIDTH_ATTRS and name in cut):
                continue
            if attr not in PLAN_ATTRS or isinstance(value, tuple):
                raise PlanUnavailable(f"cutting changes {name}.{attr}, which a plan cannot set")
            changes.setdefault(name, {})[attr] = sorted(value) if isinstance(value, set) else value
    return changes


def _same_structure(built: nn.Module, graph: nn.Module) -> None:
    a, b = built.state_dict(), graph.state_dict()
    shapes = {k: tuple(v.shape) for k, v in a.items()}
    if shapes != {k: tuple(v.shape) for k, v in b.items()}:
        odd = sorted(set(shapes.items()) ^ {(k, tuple(v.shape)) for k, v in b.items()})[:3]
        raise PlanUnavailable(f"the plan's build differs from the graph build in {odd}")
    types = {n: type(m) for n, m in built.named_modules()}
    if types != {n: type(m) for n, m in graph.named_modules()}:
        raise PlanUnavailable("the plan's build has other module types than the graph build")


def plain_base(model: nn.Module) -> nn.Module:
    """A copy of the plain base inside wrapped ``model``: adapted layers back to their base
    layer, parametrised tensors back to their stored originals (the base's tensors, and the
    task's trained values where the task trains them)."""
    base = copy.deepcopy(model)
    paths: dict[int, list[str]] = {}
    for name, m in base.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    for m in list(base.modules()):
        if isinstance(m, AdaptedLayer):
            if paths[id(m)] == [""]:
                return m.base
            for name in paths[id(m)]:
                parent, _, child = name.rpartition(".")
                base.get_submodule(parent)._modules[child] = m.base
        elif parametrize.is_parametrized(m):
            cls = type(m)  # a class of its own first: see wrap.bake_parametrizations
            m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            with torch.no_grad():
                for attr in list(m.parametrizations):
                    parametrize.remove_parametrizations(m, attr, leave_parametrized=False)
    base.__dict__.pop("sparta_report", None)
    return base
