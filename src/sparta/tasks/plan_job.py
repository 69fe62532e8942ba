"""One build from a plan: the task's tensors for each module of the base, computed as the
masked task model would (adapters fused on the kept block, channel masks, shared bias masks,
attention projections), checked against the base (kinds, shapes, which tensors a task may
hold), and cut as the plan says. Used by :class:`.from_plan.PlanBuilder`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..adapters.base import get_adapter, grouped_mask
from ..utils import NORMS
from .kept import Stored
from .manifest import BASELINES, ArtifactError
from .plan_cuts import (  # noqa: F401  (_cut_widths, decode_set: re-exported)
    _check_groups,
    _cut,
    _cut_widths,
    _is_layer,
    _like,
    _like_float,
    _out_width,
    _set_widths,
    _spread,
    _take,
    decode_set,
)
from .plan_fuse import fused_layer

_QKV = "qkv"  # adapters of a packed projection, in row order; "out" alone on out_proj
_BIAS_OF = {"bias": ("weight",), "in_proj_bias": ("in_proj_weight", "q_proj_weight",
            "k_proj_weight", "v_proj_weight")}  # fmt: skip


class _Job:
    """One build: the task's tensors, its keys by module, and which keys were used."""

    def __init__(self, builder, task, path: str):  # builder: a from_plan.PlanBuilder
        m = task.manifest
        self.builder, self.path = builder, path
        self.device = builder.device
        self._moved: dict[int, tuple[Tensor, Tensor]] = {}
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
    def on(self, index: Tensor | None) -> Tensor | None:
        """Index set ``index`` (on the CPU, as decoded) on the base's device, moved once."""
        if index is None or self.device.type == "cpu":
            return index
        moved = self._moved.get(id(index))
        if moved is None:
            moved = self._moved[id(index)] = (index, index.to(self.device))
        return moved[1]

    def like(self, t: Tensor, like: Tensor) -> Tensor:
        """Task tensor ``t`` on ``like``'s device, and dtype if floating point."""
        return _like_float(t, like)

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

    def view(self, roles: dict, prefix: tuple, out: int, inp: int, groups: int, like: Tensor):
        """The adapter (``Adapter.view``) over the task tensors with roles ``prefix + (name,)``."""
        got = self.adapter_keys(roles, prefix, out, inp, groups)
        return self.view_of(got, out, inp, groups, like)

    def view_of(self, got: dict, out: int, inp: int, groups: int, like: Tensor):
        """The adapter over the whole task tensors ``got`` (``{name: key}``, checked)."""
        tensors = {name: self.like(self.tensors[key], like) for name, key in got.items()}
        return self.cls.view(out, inp, groups, self.options, tensors)

    def adapter_keys(self, roles: dict, prefix: tuple, out: int, inp: int, groups: int) -> dict:
        """``{adapter tensor name: task key}`` of the roles ``prefix + (name,)``, checked: the
        names, shapes and kinds an adapter of this geometry holds."""
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
        return got

    # -- adapted layers ----------------------------------------------------------------------------
    def fused_layer(self, name: str, target: nn.Module, src: nn.Module, cut) -> None:
        """``target`` (the skeleton's copy of adapted layer ``src``) made the task's plain
        fused layer (:func:`.plan_fuse.fused_layer`)."""
        fused_layer(self, name, target, src, cut)

    # -- every other module ------------------------------------------------------------------------
    def fill(self, name: str, target: nn.Module, src: nn.Module, cut) -> None:
        """Fresh tensors for ``target`` (a skeleton copy of base module ``src``)."""
        roles = self.owners.get(name, {})
        out_keep, in_keep = cut if cut is not None else (None, None)
        if roles and isinstance(src, _BatchNorm) and self._fill_norm(name, target, src, roles, cut):
            return
        params = target._parameters
        if params:
            width = _out_width(src)
            for attr, p in list(params.items()):
                if p is not None:
                    value, trained = self.value(name, src, roles, attr, (width, out_keep, in_keep))
                    params[attr] = nn.Parameter(value, requires_grad=trained)
        self.fill_buffers(name, target, src, roles, out_keep)
        if cut is not None:
            _set_widths(target)

    def _fill_norm(self, name: str, target: nn.Module, src: nn.Module, roles: dict, cut) -> bool:
        """:meth:`fill` of a BatchNorm in the usual case, in one pass: the task holds all its
        tensors (each of the kind and full shape the base's has, on its dtype and device),
        those per channel stored cut by the weight's ``mask_out`` alone, and the plan keeps
        exactly what that mask keeps. Each is then its stored entries (the mask is all ones
        on them: not read), copied; this is what the general path computes there, with the
        same checks. ``False`` (nothing set) in any other case: the general path runs."""
        mask_key = roles.get(("mask", "weight", "mask_out"))
        if mask_key is None or len(roles) != 1 + len(src._parameters) + len(src._buffers):
            return False
        rows = None if cut is None else cut[0]
        if cut is not None and cut[1] is not None:
            return False
        table, store = self.table, self.tensors
        m = table[mask_key]
        width = src.num_features
        if m["kind"] != "mask" or m["shape"] != [width]:
            return False
        kept = store.kept_of(mask_key)
        if not store._same(rows, kept, width):
            return False
        found = []
        for attrs, kind in ((src._parameters, "param"), (src._buffers, "stat")):
            for attr, base in attrs.items():
                key = roles.get(("value", attr))
                if key is None or base is None:
                    return False
                e = table[key]
                per_channel = base.dim() == 1 and base.shape[0] == width
                expected = (mask_key, None) if per_channel else (None, None)
                if (
                    e["kind"] != kind
                    or e["shape"] != list(base.shape)
                    or ("stored" in e) is not per_channel
                    or (e.get("rows"), e.get("cols")) != expected
                ):
                    return False
                t, _ = store._read(key)
                if t.dtype != base.dtype or t.device != base.device:
                    return False
                found.append((attrs is src._parameters, attr, key, t))
        self.used.add(mask_key)
        params, buffers = target._parameters, target._buffers
        for is_param, attr, key, t in found:
            self.used.add(key)
            if is_param:
                params[attr] = nn.Parameter(t.clone(), requires_grad=True)
            else:
                buffers[attr] = t.clone()
        if cut is not None:
            _set_widths(target)
        return True

    def fill_buffers(self, name: str, target: nn.Module, src: nn.Module, roles: dict, rows):
        """Fresh buffers for ``target``: the task's statistics (BatchNorm only), else the
        base's, cut to the kept rows where they are per output channel."""
        buffers = target._buffers
        if not buffers:
            return
        width = _out_width(src)
        for attr, b in list(buffers.items()):
            if b is None:
                continue
            cut = rows if b.dim() >= 1 and b.shape[0] == width else None
            stat, fresh = self.take_cut(roles, ("value", attr), b, "stat", cut, None)
            if stat is not None and not isinstance(src, _BatchNorm):
                raise ArtifactError(
                    f"task {self.path!r}: it holds buffer {attr!r} of {name!r}, a "
                    f"{type(src).__name__}; a task holds BatchNorm statistics only"
                )
            if stat is None:
                buffers[attr] = _cut(b, attr, width, self.on(cut), None)
            else:
                buffers[attr] = stat if fresh else stat.clone()

    def value(
        self, name: str, src: nn.Module, roles: dict, attr: str, cut: tuple
    ) -> tuple[Tensor, bool]:
        """``(value, trained)``: a fresh tensor of a parameter's value as the task model
        computes it (masks and adapters applied), cut as ``cut`` = ``(width, out_keep,
        in_keep)`` says (:func:`_cut`), computed on the kept entries where it can be."""
        if not roles.get(("adapters of", attr)):
            return self._masked_cut(name, src, roles, attr, cut)
        base = src._parameters[attr]
        own = self.take(roles, ("value", attr), base)
        self._check_may_hold(own, name, src, attr)
        value = base if own is None else own
        adapters = roles[("adapters of", attr)]  # attention projections: (W + delta) * M each
        rows = value.shape[0] // len(adapters)
        parts = value.split(rows)
        views = [
            self.view(roles, ("adapters", attr, a), rows, value.shape[1], 1, value)
            for a in adapters
        ]
        value = torch.cat([(w + v.delta()) * v.mask_matrix() for w, v in zip(parts, views)])
        width, out_keep, in_keep = cut
        return _cut(value, attr, width, self.on(out_keep), self.on(in_keep)), own is not None

    def _masked_cut(self, name: str, src: nn.Module, roles: dict, attr: str, cut: tuple):
        """:meth:`value` of a parameter without adapters: its kept entries times theirs of
        its mask, read from the task's stored entries (``cut(v * m) == cut(v) * cut(m)``)."""
        base = src._parameters[attr]
        width, out_keep, in_keep = cut
        rows = out_keep if base.dim() >= 1 and base.shape[0] == width else None
        cols = in_keep if attr == "weight" else None
        own, fresh = self.take_cut(roles, ("value", attr), base, "param", rows, cols)
        if own is not None:
            self._check_may_hold(own, name, src, attr)
            value = own
        else:
            value, fresh = (
                _take(base, self.on(rows), self.on(cols)),
                rows is not None or cols is not None,
            )
        mask = self._cut_mask(roles, attr, base, src, rows, cols)
        if mask is not None:
            value, fresh = value * mask, True
        return (value if fresh else value.clone()), own is not None

    def _cut_mask(self, roles: dict, attr: str, base: Tensor, src: nn.Module, rows, cols):
        """The mask of parameter ``attr`` cut as its value (:meth:`mask`), or ``None`` where
        it keeps every entry of the cut. A mask of rows alone (a norm's, a bias's) is read
        from its kept indices (:meth:`.kept.Stored.mask_cut`): no op where the plan cuts
        what it pruned."""
        key = self._row_mask_key(roles, attr, base)
        if key is not None:
            mask, keeps = self.tensors.mask_cut(key, rows)
            if keeps:
                return None
            return _on(mask.view(-1, *([1] * (base.dim() - 1))), base.device)
        mask = self.mask(roles, attr, base, src)
        if mask is None:
            return None
        wide = mask.dim() >= 2 and mask.shape[1] != 1
        on_rows = self.on(rows) if mask.shape[0] != 1 else None
        return _take(mask, on_rows, self.on(cols) if wide else None)

    def _row_mask_key(self, roles: dict, attr: str, value: Tensor) -> str | None:
        """The key of the one 1-D mask of ``value``'s rows (its own ``mask_out`` when it has
        no ``mask_in`` or is 1-D; a bias: its weight's ``mask_out``), checked to fit it;
        ``None``: any other case (:meth:`mask` then reads, checks and refuses)."""
        key = roles.get(("mask", attr, "mask_out"))
        if key is not None:
            if ("mask", attr, "mask_in") in roles:
                return None
        elif attr == "bias":
            key = roles.get(("mask", "weight", "mask_out"))
        e = None if key is None else self.table[key]
        if e is None or e["kind"] != "mask" or e["shape"] != [value.shape[0]]:
            return None
        self.used.add(key)
        return key

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
                return _on(out.view(-1, *([1] * (value.dim() - 1))), value.device)
            return _on(_spread(grouped_mask(out, inp, groups), value), value.device)
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
        return _on(mask, value.device)

    def _may_hold(self, name: str, src: nn.Module, attr: str) -> bool:
        """Which plain tensors a task may replace (as the task model's trainable ones, see
        ``wrap``): anything in the head, norms, and the biases of adapted attention."""
        if self.baseline or isinstance(src, NORMS):
            return True
        in_head = any(name == h or name.startswith(h + ".") for h in self.head)
        parent, _, child = name.rpartition(".")
        attention_bias = (attr == "in_proj_bias" and name in self.adapted) or (
            attr == "bias" and child == "out_proj" and parent in self.adapted
        )
        return in_head or attention_bias

    def finish(self) -> None:
        left = sorted(set(self.table) - self.used)
        if left:
            raise ArtifactError(
                f"task {self.path!r}: tensors {left[:3]} fit no module of this base as the task "
                "model would use them; the file was edited or made for another model"
            )


def _on(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device)
