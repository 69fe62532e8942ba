"""A task on a base: rebuild the masked task model from a task's manifest and tensors.

The manifest comes from a file, so nothing it says may reach the caller's base: the layers it
lists as adapted must be the very layers the adapter adapts in this base (a head or a norm is
refused), the masked sites must be those the rebuilt model masks, every tensor it loads must
be a task tensor of the rebuilt model (never a frozen base tensor) at the dtype and shape the
base implies, and no tensor written may share storage with the base.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..errors import ConfigError, SkippedLayerWarning
from ..masks import ensure_masks, resolve_mask
from .fingerprint import _base_names, _masked_sites, _task_kinds
from .manifest import BASELINES
from .taskfile import _DTYPES, ArtifactError

_FROZEN = ("weight", "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def task_model(
    base: nn.Module, task, share_frozen: bool, protected: set[int] | None = None
) -> nn.Module:
    """The masked task model of ``task`` (a :class:`~sparta.tasks.Task`) on ``base``
    (:func:`~sparta.tasks.apply_task` without the base check). ``share_frozen=True`` shares the storage of
    the adapted layers' frozen weights with ``base`` instead of copying it (for building a
    compact model, which replaces those weights by fused ones; never train such a model).
    ``protected``: storage addresses of ``base`` (:func:`storages`), if already known."""
    from ..wrapping import wrap

    m = task.manifest
    for name in m["adapted"] + m["head"]:
        _module(base, name, "lists")
    if m["adapter"]["name"] in BASELINES:  # a plain model: every tensor is the task's
        model = copy.deepcopy(base)
        _attach_masks(model, m["masked"])
        _load(model, task, protected=storages(base) if protected is None else protected)
        return model
    _refuse_adapted(base, task, [n for n in m["adapted"] if not _adaptable(base, n, m["head"])])
    copied = _frozen_sharing_copy(base, m["adapted"], m["head"]) if share_frozen else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedLayerWarning)
            model = wrap(
                copied if share_frozen else copy.deepcopy(base),
                task.adapter,
                include=[_glob_escape(n) for n in m["adapted"]],
                head=m["head"],
                inplace=True,
                **task.options,
            )
    except ConfigError as exc:
        raise ArtifactError(f"the task does not fit this base: {exc}") from None
    _check_adapted(base, model, task)
    _attach_masks(model, m["masked"])
    _load(model, task, protected=storages(base) if protected is None else protected)
    return model


def storages(model: nn.Module) -> set[int]:
    """Addresses of the storages of every parameter and buffer of ``model``."""
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def _module(model: nn.Module, name: str, verb: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ArtifactError(f"the task {verb} {name!r}, which the base does not have") from None


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _adaptable(base: nn.Module, name: str, head: list[str]) -> bool:
    """Whether an adapter could adapt layer ``name`` at all (checked again, exactly, by
    wrapping): a Linear, convolution or attention layer outside the head."""
    if any(name == h or name.startswith(h + ".") for h in head):
        return False
    module = base.get_submodule(name)
    if isinstance(module, _ConvNd):
        return not module.transposed
    return isinstance(module, nn.Linear | nn.MultiheadAttention)


def _check_adapted(base: nn.Module, model: nn.Module, task) -> None:
    """The layers the adapter adapted in the rebuilt model are exactly the listed ones."""
    report = model.sparta_report
    listed, got = set(task.manifest["adapted"]), set(report.adapted)
    reasons = {s.name: s.reason for s in report.skipped}
    _refuse_adapted(base, task, sorted(listed - got), reasons)
    if listed != got:
        raise ArtifactError(
            f"the task's adapted layers do not select the same layers in this base "
            f"(also adapted: {sorted(got - listed)[:3]})"
        )


def _refuse_adapted(base: nn.Module, task, wrong: list[str], reasons=None) -> None:
    if not wrong:
        return
    reasons, head = reasons or {}, task.manifest["head"]
    named = "; ".join(
        f"{n} ({type(base.get_submodule(n)).__name__}"
        + (f": {reasons[n]}" if n in reasons else "")
        + (", the head" if n in head else "")
        + ")"
        for n in wrong[:3]
    )
    raise ArtifactError(
        f"the task lists {named} as adapted, but adapter {task.adapter!r} with options "
        f"{task.options} does not adapt it in this base (only Linear, convolution and "
        "attention layers outside the head are adapted); the file was edited or made for "
        "another model"
    )


def _attach_masks(model: nn.Module, masked: list) -> None:
    for name, attr in masked:
        module = _module(model, name, "masks")
        try:
            if attr == "in_proj_weight" and isinstance(module, nn.MultiheadAttention):
                resolve_mask(model, name, "q")
            else:
                ensure_masks(module)
        except ConfigError as exc:
            raise ArtifactError(
                f"the task masks {name!r} ({attr}), which cannot be: {exc}"
            ) from None
    sites = {tuple(s) for s in _masked_sites(model)}
    if sites != {tuple(s) for s in masked}:
        odd = sorted(sites ^ {tuple(s) for s in masked})[:3]
        raise ArtifactError(
            f"the task's masked tensors do not match what masking them gives in this base "
            f"(differing: {odd})"
        )


def _frozen_sharing_copy(base: nn.Module, adapted: list[str], head: list[str]) -> nn.Module:
    """A deep copy of ``base`` whose adapted layers' weights alias the base's storage (new
    Parameter objects, so flags set on the copy stay on the copy); everything else is copied.
    Only layers an adapter can adapt (Linear, convolutions, attention) outside the head share:
    whatever else the manifest says, a norm or the head is always copied."""
    memo = {}
    for name in adapted:
        if any(name == h or name.startswith(h + ".") for h in head):
            continue
        module = _module(base, name, "adapts")
        if not isinstance(module, nn.Linear | _ConvNd | nn.MultiheadAttention):
            continue
        for sub in (module, getattr(module, "out_proj", None)):
            for attr in _FROZEN:
                p = getattr(sub, "_parameters", {}).get(attr)
                if p is not None:
                    memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return copy.deepcopy(base, memo)


def _load(
    model: nn.Module, task, cache: dict | None = None, protected: set[int] | None = None
) -> None:
    """Load ``task``'s tensors into the wrapped ``model``. ``cache`` (a dict kept by the caller
    for this model) saves the walks over the model when loading task after task into it;
    ``protected``: storages no write may reach (the base's)."""
    cache = {} if cache is None else cache
    if "sd" not in cache:
        cache["sd"], cache["kinds"] = model.state_dict(), _task_kinds(model)
        # Every mask, statistic and adapter tensor must be stored; a trainable tensor that
        # the base has (a norm, a bias, the head) may be absent: it keeps the base's value.
        # An absent adapter tensor would keep its random initial value instead.
        based = _base_names(model)
        cache["owned"] = {
            k for k, kind in cache["kinds"].items() if kind != "param" or k not in based
        }
    sd, kinds = cache["sd"], cache["kinds"]
    table = task.manifest["tensors"]
    unknown = sorted(set(table) - set(sd))
    missing = sorted(cache["owned"] - set(table))
    if unknown or missing:
        raise ArtifactError(
            f"task does not fit the rebuilt model: unknown tensors {unknown[:3]}, "
            f"missing masks, statistics or adapter tensors {missing[:3]}"
        )
    for key, e in table.items():
        _check_target(key, e, sd[key], kinds.get(key), protected or set())
    full = task.full_tensors()
    with torch.no_grad():
        for key, t in full.items():
            sd[key].copy_(t.to(sd[key].dtype))
    trainable = {k for k, e in table.items() if e["kind"] == "param"}
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(name in trainable)


def _check_target(key: str, e: dict, target: torch.Tensor, kind, protected: set[int]) -> None:
    """Refuse to write entry ``e`` into ``target`` unless it is a task tensor of that kind,
    shape and dtype, in storage of its own."""
    if kind != e["kind"]:
        what = f"a {kind}" if kind else "a frozen tensor of the base"
        raise ArtifactError(
            f"the task writes {key!r} as a {e['kind']}, but in this base it is {what}; "
            "a task may only hold its own tensors (adapters, masks, norms, biases, head)"
        )
    dtype = e.get("as") if e["kind"] == "mask" else e["dtype"]
    if list(target.shape) != e["shape"] or (dtype and target.dtype != _DTYPES[dtype]):
        raise ArtifactError(
            f"task tensor {key!r} has shape {e['shape']} {dtype}, the model expects "
            f"{list(target.shape)} {str(target.dtype).removeprefix('torch.')}"
        )
    if target.numel() and target.untyped_storage().data_ptr() in protected:
        raise ArtifactError(f"the task would write {key!r} into the base's own storage; refused")
