"""One build from a plan: the task's tensors for each module of the base, computed as the
masked task model would (adapters fused on the kept block, channel masks, shared bias masks,
attention projections), checked against the base (kinds, shapes, which tensors a task may
hold), and cut as the plan says. Used by :class:`.from_plan.PlanBuilder`.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..adapters.base import get_adapter, grouped_mask
from ..adapters.forms import form_of
from ..utils import NORMS
from .kept import Stored
from .manifest import BASELINES, ArtifactError
from .plan_cuts import (  # noqa: F401  (_cut_widths, decode_set: re-exported)
    _all,
    _all_kept,
    _check_groups,
    _cut,
    _cut_widths,
    _depthwise,
    _is_layer,
    _like,
    _like_float,
    _out_width,
    _set_widths,
    _spread,
    _take,
    _with_delta,
    decode_set,
)

_QKV = "qkv"  # adapters of a packed projection, in row order; "out" alone on out_proj
_BIAS_OF = {"bias": ("weight",), "in_proj_bias": ("in_proj_weight", "q_proj_weight",
            "k_proj_weight", "v_proj_weight")}  # fmt: skip


class _Job:
    """One build: the task's tensors, its keys by module, and which keys were used."""

    def __init__(self, builder, task, path: str):  # builder: a from_plan.PlanBuilder
        m = task.manifest
        self.builder, self.path = builder, path
        self.table = m["tensors"]
        # Not Task.full_tensors(), which keeps them on the task: a bank holds its tasks, and
        # a cached task costs its compact model only.
        self.tensors = Stored(task.tensors, self.table, path)
        self.adapted = set(m["adapted"])
        self.owners = builder.owners(self.table, self.adapted)
        self.used: set[str] = set()
        self.head = tuple(m["head"])
        self.baseline = m["adapter"]["name"] in BASELINES and not m["adapted"]
        if not self.baseline:  # a baseline adapts nothing and may hold every tensor
            self.cls = get_adapter(m["adapter"]["name"])
            self.options = self.cls.resolve_options(dict(m["adapter"]["options"]))
            self.label = repr(sorted(self.options.items()))
            builder.check_adapted(task, self.cls, self.options)
        unknown = [
            k for roles in self.owners.values() for r, k in roles.items() if r[0] == "unknown"
        ]
        missing = [n for n in self.owners if n not in builder.modules]
        if not (unknown or missing):
            builder.check_masked(task, self.owners)
        if unknown or missing:
            raise ArtifactError(
                f"task {path!r} holds tensors of no module of this base: "
                f"{(unknown + missing)[:3]}; the file was edited or made for another model"
            )

    # -- the plan's cuts ---------------------------------------------------------------------------
    def cuts(self, plan: dict) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        sets: dict[int, Tensor] = {}

        def kept(i):
            if i is not None and i not in sets:
                sets[i] = decode_set(plan["sets"][i], self.path)
            return None if i is None else sets[i]

        out = {}
        for name, (o, i) in plan["cuts"].items():
            module = self.builder.modules.get(name)
            widths = _cut_widths(module)
            if widths is None:
                kind = "no module" if module is None else f"a {type(module).__name__}"
                raise ArtifactError(
                    f"task {self.path!r}: the plan cuts {name!r}, which is {kind} in this base "
                    "(only convolutions, Linear and BatchNorm layers are cut)"
                )
            for side, idx, width in (("output", o, widths[0]), ("input", i, widths[1])):
                if idx is not None and (width is None or plan["sets"][idx][0] != width):
                    raise ArtifactError(
                        f"task {self.path!r}: the plan cuts {width or 'no'} {side}s of {name!r} "
                        f"with a set of width {plan['sets'][idx][0]}"
                    )
            keep = kept(o), kept(i)
            _check_groups(module, keep[0], name, self.path)
            out[name] = keep
        return out

    # -- tensors -----------------------------------------------------------------------------------
    def take(
        self, roles: dict, role: tuple, like: Tensor | None = None, kind: str = "param"
    ) -> Tensor | None:
        """The task tensor of ``role`` (``None`` if absent), which must be of ``kind`` and,
        with ``like``, of its shape (then on its device and dtype)."""
        key = self._key(roles, role, like, kind)
        return None if key is None else _like(self.tensors[key], like)

    def take_cut(
        self, roles: dict, role: tuple, like: Tensor, kind: str, rows, cols
    ) -> tuple[Tensor | None, bool]:
        """``(take(...)[rows][:, cols], fresh)`` read from the stored entries (see
        :meth:`.kept.Stored.cut`); ``(None, False)`` if absent."""
        key = self._key(roles, role, like, kind)
        if key is None:
            return None, False
        t, fresh = self.tensors.cut(key, rows, cols)
        out = _like(t, like)
        return out, fresh or out is not t

    def _key(self, roles: dict, role: tuple, like: Tensor | None, kind: str) -> str | None:
        """The key of ``role``, checked: of ``kind`` and, with ``like``, of its shape."""
        key = roles.get(role)
        if key is None:
            return None
        e = self.table[key]
        if e["kind"] != kind:
            raise ArtifactError(
                f"task {self.path!r}: it holds {key!r} as a {e['kind']}, where "
                f"the task model has a {kind}"
            )
        self.used.add(key)
        if like is not None and tuple(e["shape"]) != tuple(like.shape):
            raise ArtifactError(
                f"task {self.path!r}: tensor {key!r} is {list(e['shape'])}, the base's is "
                f"{list(like.shape)}"
            )
        return key

    def view(
        self, roles: dict, prefix: tuple, out: int, inp: int, groups: int, like: Tensor, cut=None
    ):
        """The adapter (``Adapter.view``) over the task tensors with roles ``prefix + (name,)``;
        with ``cut`` (kept rows, cols), the same restricted to them, or ``None`` (see
        :meth:`_cut_view`)."""
        expected = self.builder.adapter_shapes(self.cls, out, inp, groups, self.options, self.label)
        n = len(prefix)
        got = {r[n]: k for r, k in roles.items() if r[:n] == prefix and len(r) == n + 1}
        if set(got) != set(expected):
            raise ArtifactError(
                f"task {self.path!r}: adapter tensors {sorted(got)} at {prefix}, adapter "
                f"{self.cls.name!r} holds {sorted(expected)}"
            )
        for name, key in got.items():
            shape = self.table[key]["shape"]
            if tuple(shape) != expected[name]:
                raise ArtifactError(
                    f"task {self.path!r}: adapter tensor {key!r} is {list(shape)}, expected "
                    f"{list(expected[name])}"
                )
            kind = "mask" if name in self.cls.mask_names else "param"
            if self.table[key]["kind"] != kind:
                raise ArtifactError(
                    f"task {self.path!r}: adapter tensor {key!r} is stored as a "
                    f"{self.table[key]['kind']}, the adapter holds a {kind}"
                )
            self.used.add(key)
        if cut is not None:
            return self._cut_view(got, cut, like)
        tensors = {name: _like_float(self.tensors[key], like) for name, key in got.items()}
        return self.cls.view(out, inp, groups, self.options, tensors)

    def _cut_view(self, got: dict, cut: tuple[Tensor, Tensor], like: Tensor):
        """The adapter restricted to rows x cols ``cut`` (a view of that geometry over the
        cut tensors, read from the stored entries), or ``None`` unless it is one: the
        adapter's masks are its two channel masks, and each other tensor is stored by the
        rows of ``mask_out`` on its first axis and/or the columns of ``mask_in`` on its second
        (as export writes an adapter whose delta is cut entry by entry, the same assumption
        that lets it drop the pruned entries), at the shapes an adapter of that size holds."""
        if tuple(self.cls.mask_names) != ("mask_out", "mask_in"):
            return None
        rows, cols = cut
        axes = {got["mask_out"]: (rows, None), got["mask_in"]: (cols, None)}
        for _name, key in got.items():
            e = self.table[key]
            if key in axes:
                continue
            if "stored" not in e or e.get("rows") not in (None, got["mask_out"]):
                return None
            if e.get("cols") not in (None, got["mask_in"]):
                return None
            axes[key] = (rows if e.get("rows") else None, cols if e.get("cols") else None)
        shapes = self.builder.adapter_shapes(
            self.cls, len(rows), len(cols), 1, self.options, self.label
        )
        tensors = {name: self.tensors.cut(key, *axes[key])[0] for name, key in got.items()}
        if any(tuple(t.shape) != shapes[name] for name, t in tensors.items()):
            return None
        tensors = {name: _like_float(t, like) for name, t in tensors.items()}
        return self.cls.view(len(rows), len(cols), 1, self.options, tensors)

    # -- adapted layers ----------------------------------------------------------------------------
    def fused_layer(self, name: str, src: nn.Module, cut) -> nn.Module:
        roles = self.owners.get(name, {})
        out_f, in_f = src.weight.shape[0], src.weight.shape[1] * getattr(src, "groups", 1)
        groups = getattr(src, "groups", 1)
        weight = src.weight.detach()
        out_keep, in_keep = cut if cut is not None else (None, None)
        form = form_of(src)
        depthwise, by_group = _depthwise(src), groups > 1 and not _depthwise(src)
        small = None
        if form.standardise is None and groups == 1:  # the kept block alone, when it can be
            rows, cols = _all(out_keep, out_f, weight), _all(in_keep, in_f, weight)
            small = self.view(roles, ("adapter",), out_f, in_f, 1, weight, cut=(rows, cols))
        adapter = small or self.view(roles, ("adapter",), out_f, in_f, groups, weight)
        with torch.no_grad():
            if small is not None:
                weight = _with_delta(
                    weight.index_select(0, rows).index_select(1, cols), small.delta()
                )
                if not (bool(small.mask_out.all()) and bool(small.mask_in.all())):
                    weight *= _spread(small.mask_matrix().to(weight.dtype), weight)
                kept_out = small.mask_out
            elif form.standardise is not None:  # its weight depends on whole rows: fuse, then cut
                mask = _spread(adapter.mask_matrix(), weight)
                fused = _with_delta(weight.clone(), adapter.delta()) * mask
                weight = _take(form.standardise(src, fused) * mask, out_keep, in_keep)
            else:
                rows = _all(out_keep, out_f, weight)
                if depthwise or by_group:
                    weight = weight.index_select(0, rows)
                    delta = adapter.delta_at(rows, None)
                    mask = adapter.mask_matrix().index_select(0, rows)
                else:
                    cols = _all(in_keep, in_f, weight)
                    weight = weight.index_select(0, rows).index_select(1, cols)
                    delta = adapter.delta_at(rows, cols)
                    mask = None if _all_kept(adapter, rows, cols) else adapter.mask_at(rows, cols)
                weight = _with_delta(weight, delta)
                if mask is not None and not bool(mask.all()):
                    weight *= _spread(mask, weight)
            if small is None:
                kept_out = _take(adapter.mask_out, out_keep, None)
            if src.bias is None and ("base", "bias") in roles:
                raise ArtifactError(
                    f"task {self.path!r}: it holds a bias of {name!r}, which has none"
                )
            bias = self.take(roles, ("base", "bias"), src.bias)
            trained = bias is not None
            bias = src.bias if bias is None else bias
            if bias is not None:
                bias = _take(bias.detach(), out_keep, None) * kept_out.to(bias.dtype)
        plain = copy.copy(src)
        for slot in ("_parameters", "_buffers", "_modules"):
            plain.__dict__[slot] = dict(plain.__dict__[slot])
        cls = form.plain_class(src)
        if cls is not type(plain):
            plain.__class__ = cls
            for extra in set(plain._parameters) - {"weight", "bias"}:  # e.g. a gain
                del plain._parameters[extra]
        plain._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            plain._parameters["bias"] = nn.Parameter(bias, requires_grad=trained)
        if cut is not None:
            _set_widths(plain)
        return plain

    # -- every other module ------------------------------------------------------------------------
    def fill(self, name: str, target: nn.Module, src: nn.Module, cut) -> None:
        """Fresh tensors for ``target`` (a skeleton copy of base module ``src``)."""
        roles = self.owners.get(name, {})
        out_keep, in_keep = cut if cut is not None else (None, None)
        width = _out_width(src)
        for attr, p in list(target._parameters.items()):
            if p is None:
                continue
            value, trained = self.value(name, src, roles, attr, (width, out_keep, in_keep))
            target._parameters[attr] = nn.Parameter(value, requires_grad=trained)
        for attr, b in list(target._buffers.items()):
            if b is None:
                continue
            rows = out_keep if b.dim() >= 1 and b.shape[0] == width else None
            stat, fresh = self.take_cut(roles, ("value", attr), b, "stat", rows, None)
            if stat is not None and not isinstance(src, _BatchNorm):
                raise ArtifactError(
                    f"task {self.path!r}: it holds buffer {attr!r} of {name!r}, a "
                    f"{type(src).__name__}; a task holds BatchNorm statistics only"
                )
            if stat is None:
                target._buffers[attr] = _cut(b.detach(), attr, width, out_keep, None)
            else:
                target._buffers[attr] = stat if fresh else stat.clone()
        if cut is not None:
            _set_widths(target)

    def value(
        self, name: str, src: nn.Module, roles: dict, attr: str, cut: tuple
    ) -> tuple[Tensor, bool]:
        """``(value, trained)``: a fresh tensor of a parameter's value as the task model
        computes it (masks and adapters applied), cut as ``cut`` = ``(width, out_keep,
        in_keep)`` says (:func:`_cut`), computed on the kept entries where it can be."""
        base = src._parameters[attr].detach()
        if not roles.get(("adapters of", attr)):
            return self._masked_cut(name, src, roles, attr, cut)
        own = self.take(roles, ("value", attr), base)
        self._check_may_hold(own, name, src, attr)
        value = base if own is None else own
        adapters = roles[("adapters of", attr)]  # attention projections: (W + delta) * M each
        with torch.no_grad():
            rows = value.shape[0] // len(adapters)
            parts = value.split(rows)
            views = [
                self.view(roles, ("adapters", attr, a), rows, value.shape[1], 1, value)
                for a in adapters
            ]
            value = torch.cat([(w + v.delta()) * v.mask_matrix() for w, v in zip(parts, views)])
        return _cut(value, attr, *cut), own is not None

    def _masked_cut(self, name: str, src: nn.Module, roles: dict, attr: str, cut: tuple):
        """:meth:`value` of a parameter without adapters: its kept entries times theirs of
        its mask, read from the task's stored entries (``cut(v * m) == cut(v) * cut(m)``)."""
        base = src._parameters[attr].detach()
        width, out_keep, in_keep = cut
        rows = out_keep if base.dim() >= 1 and base.shape[0] == width else None
        cols = in_keep if attr == "weight" else None
        own, fresh = self.take_cut(roles, ("value", attr), base, "param", rows, cols)
        self._check_may_hold(own, name, src, attr)
        if own is None:
            value, fresh = _take(base, rows, cols), rows is not None or cols is not None
        else:
            value = own
        with torch.no_grad():
            mask = self.mask(roles, attr, base, src)
            if mask is not None:
                wide = mask.dim() >= 2 and mask.shape[1] != 1
                mask = _take(mask, rows if mask.shape[0] != 1 else None, cols if wide else None)
                value, fresh = value * mask, True
        return (value if fresh else value.clone()), own is not None

    def _check_may_hold(self, own: Tensor | None, name: str, src: nn.Module, attr: str) -> None:
        if own is not None and not self._may_hold(name, src, attr):
            raise ArtifactError(
                f"task {self.path!r}: it holds {name}.{attr}, a frozen tensor of the base "
                f"({type(src).__name__}); a task holds adapters, masks, norms, biases and its head"
            )

    def mask(self, roles: dict, attr: str, value: Tensor, src: nn.Module) -> Tensor | None:
        """The channel mask of ``attr`` (own, or the one its weight's masks give a bias)."""
        out = self.take(roles, ("mask", attr, "mask_out"), kind="mask")
        if out is not None:
            inp = self.take(roles, ("mask", attr, "mask_in"), kind="mask")
            groups = getattr(src, "groups", 1) if isinstance(src, _ConvNd) else 1
            if out.shape[0] != value.shape[0] or (
                inp is not None and value.dim() >= 2 and inp.shape[0] != value.shape[1] * groups
            ):
                raise ArtifactError(f"task {self.path!r}: a mask of {attr!r} does not fit it")
            if value.dim() == 1 or inp is None:
                return out.view(-1, *([1] * (value.dim() - 1))).to(value.device)
            return _spread(grouped_mask(out, inp, groups), value).to(value.device)
        return self._bias_mask(roles, attr, value)

    def _bias_mask(self, roles: dict, attr: str, value: Tensor) -> Tensor | None:
        """A bias is masked by the output masks of its weight(s) (``SharedMask``,
        ``MaskedBias``): packed or separate q/k/v projections stacked in row order."""
        sources = _BIAS_OF.get(attr, ())[:1]
        if attr == "in_proj_bias" and not any(r[1] == sources[0] for r in roles if len(r) > 2):
            sources = _BIAS_OF[attr][1:]
        parts = []
        for weight in sources:
            key = roles.get(("mask", weight, "mask_out"))
            if key is not None:
                parts.append(self.tensors[key])
                continue
            names = roles.get(("adapters of", weight), ())
            keys = [roles.get(("adapters", weight, a, "mask_out")) for a in names]
            if None in keys:
                raise ArtifactError(f"task {self.path!r}: an adapter of {weight!r} has no mask")
            parts += [self.tensors[k] for k in keys]
        if not parts:
            return None
        mask = torch.cat(parts) if len(parts) > 1 else parts[0]
        if mask.shape[0] != value.shape[0]:
            raise ArtifactError(f"task {self.path!r}: the mask of {attr!r} does not fit it")
        return mask.to(value.device)

    def _may_hold(self, name: str, src: nn.Module, attr: str) -> bool:
        """Which plain tensors a task may replace (as the task model's trainable ones, see
        ``wrap``): anything in the head, norms, and the biases of adapted attention."""
        if self.baseline:
            return True
        in_head = any(name == h or name.startswith(h + ".") for h in self.head)
        parent, _, child = name.rpartition(".")
        attention_bias = (attr == "in_proj_bias" and name in self.adapted) or (
            attr == "bias" and child == "out_proj" and parent in self.adapted
        )
        return in_head or attention_bias or isinstance(src, NORMS)

    def finish(self) -> None:
        left = sorted(set(self.table) - self.used)
        if left:
            raise ArtifactError(
                f"task {self.path!r}: tensors {left[:3]} fit no module of this base as the task "
                "model would use them; the file was edited or made for another model"
            )
