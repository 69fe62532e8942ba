"""An adapted layer of a plan build: its weight ``(W + delta) * M`` and bias, cut as the plan
says, set on the skeleton's copy of the layer. Used by :class:`.plan_job._Job`.

The usual layer (channel masks, no groups, no weight standardisation) is fused on its kept
block only: ``W[rows][:, cols]`` plus the delta of the adapter viewed over the kept rows and
columns of its stored tensors, which export wrote cut by the same masks (so they are read as
they are). Where the plan keeps exactly what the masks keep, the mask of the block is all ones
by construction (the kept indices were compared, not the mask's values): no mask is read or
multiplied. Any other layer (grouped, depthwise, standardised, block masks, or tensors stored
whole) takes the general path: the whole adapter, its delta at the kept rows, masked.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..adapters.forms import form_of
from ..errors import ConfigError
from .manifest import ArtifactError
from .plan_cuts import _all, _all_kept, _set_widths, _spread, _take, _with_delta

_CHANNEL_MASKS = ("mask_out", "mask_in")


def fused_layer(job, name: str, target: nn.Module, src: nn.Module, cut) -> None:
    """Turn ``target`` (the skeleton's copy of adapted layer ``src``) into the plain layer of
    the task: fused weight, the task's (or base's) bias, widths of the cut."""
    roles = job.owners.get(name, {})
    weight = src._parameters["weight"]
    groups = src.__dict__.get("groups", 1)
    out_f, in_f = weight.shape[0], weight.shape[1] * groups
    rows, cols = cut if cut is not None else (None, None)
    form = form_of(src)
    got = job.adapter_keys(roles, ("adapter",), out_f, in_f, groups)
    fused = None
    if form.standardise is None and groups == 1:  # the kept block alone, when it can be
        fused = _block(job, got, weight, rows, cols)
    if fused is None:
        fused = _whole(job, got, src, form, (out_f, in_f, groups), rows, cols)
    weight, kept_out = fused
    bias, trained = _bias(job, name, roles, src, rows, kept_out)
    cls = form.plain_class(src)
    if cls is not type(target):
        target.__class__ = cls
        for extra in set(target._parameters) - {"weight", "bias"}:  # e.g. a gain
            del target._parameters[extra]
    target._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        target._parameters["bias"] = nn.Parameter(bias, requires_grad=trained)
    job.fill_buffers(name, target, src, roles, rows)
    if cut is not None:
        _set_widths(target)


def _block(job, got: dict, weight: Tensor, rows, cols) -> tuple[Tensor, Tensor | None] | None:
    """``(fused kept block, kept-output mask or None when all kept)``, or ``None`` unless the
    adapter has channel masks only and each other tensor is stored cut by them (the rows of
    ``mask_out`` on its first axis and/or the columns of ``mask_in`` on its second, as export
    writes an adapter whose delta is cut entry by entry) at the shapes an adapter of the kept
    block's size holds."""
    if tuple(job.cls.mask_names) != _CHANNEL_MASKS:
        return None
    table, store = job.table, job.tensors
    axes = {}
    for name, key in got.items():
        if name in _CHANNEL_MASKS:
            continue
        e = table[key]
        by_rows, by_cols = e.get("rows"), e.get("cols")
        if "stored" not in e or by_rows not in (None, got["mask_out"]):
            return None
        if by_cols not in (None, got["mask_in"]):
            return None
        axes[name] = (rows if by_rows else None, cols if by_cols else None)
    mask_out, all_out = store.mask_cut(got["mask_out"], rows)
    mask_in, all_in = store.mask_cut(got["mask_in"], cols)
    try:
        shapes = job.builder.adapter_shapes(
            job.cls, mask_out.shape[0], mask_in.shape[0], 1, job.options, job.label
        )
    except ConfigError:  # an adapter the kept block's size cannot hold (a rank above it)
        return None
    tensors = {"mask_out": job.like(mask_out, weight), "mask_in": job.like(mask_in, weight)}
    for name, (r, c) in axes.items():
        t = store.cut(got[name], r, c)[0]
        if tuple(t.shape) != shapes[name]:
            return None
        tensors[name] = job.like(t, weight)
    small = job.cls.view(mask_out.shape[0], mask_in.shape[0], 1, job.options, tensors)
    fused = _take(weight, job.on(rows), job.on(cols))
    fused = _with_delta(fused if fused is not weight else weight.clone(), small.delta())
    if all_out and all_in:
        return fused, None
    fused *= _spread(small.mask_matrix().to(fused.dtype), fused)
    return fused, None if all_out else tensors["mask_out"]


def _whole(job, got: dict, src: nn.Module, form, geometry: tuple, rows, cols):
    """:func:`_block` for any layer: the adapter over its whole stored tensors, its delta at
    the kept rows (columns), masked; a standardising layer is fused whole, then cut."""
    out_f, in_f, groups = geometry
    weight = src._parameters["weight"]
    adapter = job.view_of(got, out_f, in_f, groups, weight)
    rows_d, cols_d = job.on(rows), job.on(cols)
    if form.standardise is not None:  # its weight depends on whole rows: fuse, then cut
        mask = _spread(adapter.mask_matrix(), weight)
        fused = _with_delta(weight.clone(), adapter.delta()) * mask
        fused = _take(form.standardise(src, fused) * mask, rows_d, cols_d)
    else:
        keep = _all(rows_d, out_f, weight)
        if groups > 1:  # depthwise or grouped: every column of the kept rows
            fused = weight.index_select(0, keep)
            delta = adapter.delta_at(keep, None)
            mask = adapter.mask_matrix().index_select(0, keep)
        else:
            cols_all = _all(cols_d, in_f, weight)
            fused = weight.index_select(0, keep).index_select(1, cols_all)
            delta = adapter.delta_at(keep, cols_all)
            mask = None if _all_kept(adapter, keep, cols_all) else adapter.mask_at(keep, cols_all)
        fused = _with_delta(fused, delta)
        if mask is not None and not bool(mask.all()):
            fused *= _spread(mask, fused)
    return fused, _take(adapter.mask_out, rows_d, None)


def _bias(job, name: str, roles: dict, src: nn.Module, rows, kept_out) -> tuple:
    """``(bias or None, trained)``: the task's bias of the layer (else the base's), cut to
    the kept rows, times the kept-output mask where it does not keep them all."""
    base = src._parameters.get("bias")
    if base is None:
        if ("base", "bias") in roles:
            raise ArtifactError(f"task {job.path!r}: it holds a bias of {name!r}, which has none")
        return None, False
    own, fresh = job.take_cut(roles, ("base", "bias"), base, "param", rows, None)
    if own is None:
        bias, fresh = _take(base, job.on(rows), None), rows is not None
    else:
        bias = own
    if kept_out is not None:
        bias, fresh = bias * kept_out.to(bias.dtype), True
    return (bias if fresh else bias.clone()), own is not None
