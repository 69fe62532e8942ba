"""Build a compact model from a task's plan: slices of the base's tensors, adapters fused in.

No wrap, no task model, no graph, no trace: every module of a structure copy of the base
(:func:`skeleton`) gets fresh tensors, computed from the base's and the task's (stored
tensors, masks) and cut as the plan says (see :mod:`.plan`). An adapted layer's weight is
``(W + delta) * M`` computed on its kept block only (``Adapter.view`` reads the delta from the
task's tensors); a weight-standardising layer is fused whole, then cut. Everything read from
the task or the plan is checked against the base first (module names and types, widths, tensor
shapes, which tensors a task may hold); nothing is written to the base, and no attribute is
set but the widths of cut layers and the plan's whitelisted ones (:data:`.plan.PLAN_ATTRS`).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn

from ..adapters.layer import adapt_reason, layer_geometry
from ..devices import module_device
from ..masks import can_mask
from ..utils import gc_paused
from .apply import _adaptable, _module, _refuse_adapted
from .compact import CompactReport, GroupOutcome
from .manifest import ArtifactError
from .plan_job import _QKV, _is_layer, _Job


def skeleton(
    base: nn.Module,
    containers: dict[int, tuple[str, ...]] | None = None,
    memo: dict[int, nn.Module] | None = None,
) -> nn.Module:
    """A copy of ``base``'s modules that shares its tensors (to be replaced, never written):
    new module objects and new containers (dicts, lists, sets), nothing deeper. Much cheaper
    than ``copy.deepcopy``, which also walks every tensor. ``containers``: which attributes of
    each module (by id) are containers, from :func:`container_keys` (saves finding them).
    ``memo`` (given empty) receives ``{id(base module): its copy}``."""
    memo = {} if memo is None else memo

    def clone(module: nn.Module) -> nn.Module:
        if id(module) in memo:  # a module reachable by two paths stays one module
            return memo[id(module)]
        new = object.__new__(type(module))
        state = dict(module.__dict__)
        keys = containers.get(id(module)) if containers is not None else None
        for key in _container_keys(state) if keys is None else keys:
            state[key] = state[key].copy()
        memo[id(module)] = new
        state["_modules"] = {k: None if m is None else clone(m) for k, m in module._modules.items()}
        new.__dict__.update(state)
        return new

    return clone(base)


@contextmanager
def one_thread():
    """Torch's intra-op threads set to 1 for this thread, restored after. A build is hundreds
    of small ops; the few large enough for torch's thread pool (a kept block's delta product,
    a copy of a weight's kept rows) gain nothing from it, and waking it costs more than they
    do. Measured on 2 cores at load average 10, 40 ResNet-50 task switches at 2 threads:
    before (with the older build's 2,149 ops), 80 ms of CPU per switch on the building thread
    and 56 ms in the pool's spinning worker (a 160 x 8 x 160 product took 30 ms); with the
    pool never woken, 31 ms and 0 ms.
    The setting is per thread (OpenMP's and MKL's local counts): other threads keep theirs.
    Only with the OpenMP backend: torch's native one cannot change its count once it ran (it
    warns and keeps it)."""
    threads = torch.get_num_threads()
    if threads == 1 or not _openmp():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def container_keys(base: nn.Module) -> dict[int, tuple[str, ...]]:
    """``{id(module): names of its container attributes}`` for every module of ``base``."""
    return {id(m): _container_keys(m.__dict__) for m in base.modules()}


def _container_keys(state: dict) -> tuple[str, ...]:
    return tuple(k for k, v in state.items() if isinstance(v, dict | list | set))


class PlanBuilder:
    """Builds compact models from plans on one ``base`` (never changed); keeps what depends on
    the base alone: its modules by name and the expected adapter tensor shapes."""

    def __init__(self, base: nn.Module):
        self.base = base
        self.modules = dict(base.named_modules(remove_duplicate=False))
        self.device = module_device(base)
        self.containers = container_keys(base)  # the base is never edited (see Builder.check)
        self._shapes: dict[tuple, dict[str, tuple]] = {}
        self._owners: dict[tuple, dict] = {}
        self._adapted_ok: set[tuple] = set()
        self._info: dict[int, tuple] = {}  # per owners layout: (it, masked sites, lists found ok)

    def build(self, task, path: str = "<task>") -> tuple[nn.Module, CompactReport]:
        """``(compact model, report)`` of ``task`` (a version 3 task whose fingerprint the
        caller checked). The cyclic garbage collector is paused meanwhile: a build creates a
        few thousand small objects, and its collections (which walk every live object,
        the base's included) would cost more than the build itself; it is restored after. Torch
        runs on this thread alone meanwhile (:func:`one_thread`)."""
        with gc_paused(), torch.no_grad(), one_thread():
            return self._build(task, path)

    def _build(self, task, path: str) -> tuple[nn.Module, CompactReport]:
        plan = task.manifest["plan"]
        job = _Job(self, task, path)
        cuts = job.cuts(plan)
        copies: dict[int, nn.Module] = {}
        model = skeleton(self.base, self.containers, copies)
        done: set[int] = set()
        for name, src in self.modules.items():  # the copy's modules, by the same names
            target = copies[id(src)]
            if id(target) in done:  # shared: one module, filled once, at every place
                continue
            done.add(id(target))
            if name in job.adapted and _is_layer(src):
                job.fused_layer(name, target, src, cuts.get(name))
            else:
                job.fill(name, target, src, cuts.get(name))
        job.finish()
        _set_attrs(model, self.modules, plan["attrs"], path)
        r = plan["report"]
        groups = [GroupOutcome(*g) for g in r["groups"]]
        report = CompactReport(r["params_before"], r["params_after"], groups, list(r["notes"]))
        return model, report

    def check_adapted(self, task, cls, options: dict) -> None:
        """The layers the task lists as adapted are layers ``cls`` adapts in this base (as
        ``wrap`` would, outside the head); cached per layout."""
        m = task.manifest
        key = (cls, repr(sorted(options.items())), tuple(m["adapted"]), tuple(m["head"]))
        if key in self._adapted_ok:
            return
        for name in m["adapted"] + m["head"]:
            _module(self.base, name, "lists")
        wrong = [n for n in m["adapted"] if not _adaptable(self.base, n, m["head"])]
        wrong += [
            n
            for n in m["adapted"]
            if n not in wrong and _adapt_problem(self.modules[n], cls, options)
        ]
        _refuse_adapted(self.base, task, wrong)
        self._adapted_ok.add(key)

    def check_masked(self, task, owners: dict) -> None:
        """The masked sites the manifest lists are those its mask tensors are at, and each
        is a tensor a channel mask may sit on (``masks.can_mask``; packed attention q/k/v)."""
        listed = frozenset(tuple(site) for site in task.manifest["masked"])
        info = self._info.get(id(owners))
        if info is None or info[0] is not owners:  # (once per layout)
            found = {(n, r[1]) for n, roles in owners.items() for r in roles if r[0] == "mask"}
            info = self._info[id(owners)] = (owners, found, set())
            while len(self._info) > 4:
                self._info.pop(next(iter(self._info)))
        _, found, ok = info
        if listed in ok:  # this list was checked against this layout
            return
        wrong = sorted(listed ^ found) or [
            (n, a)
            for n, a in sorted(listed)
            if not (
                (a == "weight" and can_mask(self.modules[n]))
                or (a == "in_proj_weight" and isinstance(self.modules[n], nn.MultiheadAttention))
            )
        ]
        if wrong:
            raise ArtifactError(
                f"the task's masked tensors do not match its mask tensors or cannot be masked "
                f"in this base (differing: {wrong[:3]})"
            )
        if len(ok) >= 64:  # a bound, not an LRU: a bank's tasks mostly share one list
            ok.clear()
        ok.add(listed)

    def adapter_shapes(
        self, cls, out: int, inp: int, groups: int, options: dict, label: str
    ) -> dict:
        """``{tensor name: shape}`` an adapter of this geometry holds (built once, on meta)."""
        key = (cls, out, inp, groups, label)  # label: the options, as text
        if key not in self._shapes:
            context = cls.new_context()
            extra = {} if context is None else {"context": context}
            with torch.device("meta"):
                adapter = cls(out, inp, groups, **options, **extra)
            state = adapter.state_dict()
            self._shapes[key] = {k: tuple(t.shape) for k, t in state.items()}
        return self._shapes[key]

    def owners(self, table: dict, adapted: set[str]) -> dict[str, dict[tuple, str]]:
        """Task keys by the base module they belong to (cached per key layout)."""
        key = (tuple(table), tuple(sorted(adapted)))
        if key not in self._owners:
            owners: dict[str, dict[tuple, str]] = {}
            for k in table:
                module, role = _role(k, adapted)
                owners.setdefault(module, {})[role] = k
            for roles in owners.values():  # the adapters of each attribute, in row order
                found: dict[str, set] = {}
                for r in roles:
                    if r[0] == "adapters":
                        found.setdefault(r[1], set()).add(r[2])
                for attr, names in found.items():
                    order = sorted(names, key=lambda a: _QKV.index(a) if a in _QKV else 3)
                    roles[("adapters of", attr)] = tuple(order)
            self._owners = {key: owners}  # the latest layout only: tasks of a bank share it
        return self._owners[key]


def _role(key: str, adapted: set[str]) -> tuple[str, tuple]:
    """``(module name, role)`` of a task key (a wrapped model's state_dict key)."""
    parts = key.split(".")
    if "parametrizations" in parts:
        i = len(parts) - 1 - parts[::-1].index("parametrizations")
        module, attr, rest = (
            ".".join(parts[:i]),
            parts[i + 1] if i + 1 < len(parts) else "",
            parts[i + 2 :],
        )
        if rest == ["original"]:
            return module, ("value", attr)
        if len(rest) == 2 and rest[0] == "0":
            return module, ("mask", attr, rest[1])
        if len(rest) == 4 and rest[:2] == ["0", "adapters"]:
            return module, ("adapters", attr, rest[2], rest[3])
        return module, ("unknown", key)
    if len(parts) >= 2 and parts[-2] in ("adapter", "base") and ".".join(parts[:-2]) in adapted:
        return ".".join(parts[:-2]), (parts[-2], parts[-1])
    return ".".join(parts[:-1]), ("value", parts[-1])


def _adapt_problem(module: nn.Module, cls, options: dict) -> str | None:
    """Why adapter ``cls`` would not adapt ``module`` (wrap's rules), else ``None``."""
    if isinstance(module, nn.MultiheadAttention):
        return None if "attention" in cls.kinds else "not an attention adapter"
    kind, out, inp, groups = layer_geometry(module)
    if kind not in cls.kinds:
        return f"adapter {cls.name!r} does not adapt {kind} layers"
    return adapt_reason(module) or cls.unsupported_reason(out, inp, groups, options)


def _set_attrs(model: nn.Module, base_modules: dict, attrs: dict, path: str) -> None:
    """The plan's whitelisted attributes: each must exist on the base module as a plain int
    (never above the base's value) or set of ints (a superset of the base's)."""
    modules = dict(model.named_modules(remove_duplicate=False)) if attrs else {}
    for name, values in attrs.items():
        src, target = base_modules.get(name), modules.get(name)
        for attr, value in values.items():
            old = vars(src).get(attr) if src is not None else None
            ok = (type(old) is int and isinstance(value, int) and 0 <= value <= old) or (
                isinstance(old, set) and isinstance(value, list) and old <= set(value)
            )
            if not ok or target is None:
                raise ArtifactError(
                    f"task {path!r}: the plan sets {name}.{attr} = {str(value)[:40]}, but the "
                    f"base's is {str(old)[:40]} (a plan only lowers head counts and sizes, or "
                    "adds pruned heads)"
                )
            target.__dict__[attr] = set(value) if isinstance(old, set) else value
