"""What a pruning step measures (filters, prunable weights, MACs), read from the masks alone.

The level search of a step evaluates a dozen tentative mask states. Measuring each through the
layers (``MacCounter.count``, ``masks.kept_weights``) is exact but slow on a plain model:
every access to a parametrised weight rebuilds it. The counts depend on the masks only: a layer
keeps ``sum over its groups g of kept_out(g) * kept_in(g) * kernel`` entries and costs that many
times its output positions (recorded once by :class:`~sparta.measure.MacCounter`). So every
mask entry a count reads is laid out once in one flat vector; a tentative state is that vector
with some entries zeroed, its per-segment sums (one ``bincount``) give every layer's kept
channels, and each count is a fixed sum of products of two segment sums.

Layers whose count is not such a product (an adapter with its own ``kept_entries``, e.g.
SPLoPA's block masks) are measured the exact way, with the tentative masks copied in for the
duration. ``Pruner`` keeps the exact path too (``_exact``): it is the oracle of the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..adapters.base import Adapter
from ..adapters.layer import AdaptedLayer
from ..masks import (
    ChannelMask,
    channel_mask_of,
    kept_weights,
    resolve_mask,
    submodule,
    weight_shape,
)
from ..measure import MacCounter, attention_macs
from ..utils import NORMS
from .groups import Group

KINDS = ("filters", "weights", "macs")
_FILTER_SITES = ("out", "q", "k", "v")


class _Terms:
    """One count: ``constant + sum(coef * S[a] * S[b]) + attention + fallback layers``."""

    def __init__(self):
        self.constant = 0.0
        self.a: list[int] = []
        self.b: list[int] = []
        self.coef: list[float] = []
        self.attention: list[tuple] = []  # (name, lq, lk, products, {site: segment or None})
        self.exact: list[tuple[str, float]] = []  # (layer name, factor): measured the exact way

    def add(self, a: int, b: int, coef: float) -> None:
        """A term ``coef * S[a] * S[b]`` (``b`` -1: the segment that is always 1)."""
        self.a.append(a)
        self.b.append(b)
        self.coef.append(coef)

    def freeze(self) -> None:
        self.a_t = torch.tensor(self.a, dtype=torch.long)
        self.b_t = torch.tensor(self.b, dtype=torch.long)
        self.coef_t = torch.tensor(self.coef, dtype=torch.float64)


class Tally:
    """Filters, prunable weights and MACs of ``model`` under any tentative mask state.

    ``state()`` reads the current masks into one flat float64 vector of 0/1; ``after(state,
    ids)`` zeroes the entries of units ``ids`` (see :meth:`ids`); ``count(kind, state)`` is
    what ``Pruner._totals`` would measure with that state swapped into the masks.
    """

    def __init__(self, model: nn.Module, groups: list[Group], macs: MacCounter):
        self.model, self.groups, self.macs = model, groups, macs
        self._build()

    # -- layout ---------------------------------------------------------------------------------
    def _build(self) -> None:
        self.offsets: dict[str, int] = {}  # group name -> global id of its unit 0
        n = 0
        for g in self.groups:
            self.offsets[g.name], n = n, n + g.size
        self.n_units = n
        # key (module, site) -> [offset in the flat state, numel, its segment ids]
        self.slots: dict[tuple[str, str], list] = {}
        self.tensors: dict[tuple[str, str], Tensor] = {}
        self.seg_of: list[Tensor] = []  # per slot: segment id of each entry
        self.n_entries = self.n_segs = 0
        self.terms = {kind: _Terms() for kind in KINDS}
        members = [m for g in self.groups for m in g.members]
        names = list(dict.fromkeys(m.module for m in members))
        modules = {name: submodule(self.model, name) for name in names}
        # Layers first: they fix how their masks are split (one segment per conv group).
        for name in names:
            if not isinstance(modules[name], (nn.MultiheadAttention, *NORMS)):
                self._layer(self.terms["weights"], name, 1.0)
        for name, positions in self.macs.positions.items():
            self._layer(self.terms["macs"], name, positions)
        for name in names:
            if isinstance(modules[name], nn.MultiheadAttention):
                self._attention(self.terms["weights"], name, 1.0, 1.0, False)
        for name, (lq, lk) in self.macs.attention.items():
            self._attention(self.terms["macs"], name, lq, lk, True)
        self._filters(members, modules)
        for m in members:
            self._slot(m.module, m.site)
        self.one = self.n_segs  # a segment whose sum is always 1
        for t in self.terms.values():
            t.b = [self.one if b < 0 else b for b in t.b]
            t.freeze()
        self.segment = torch.cat(self.seg_of) if self.seg_of else torch.zeros(0, dtype=torch.long)
        self._members(members)
        self.signature = self._signature(self.tensors)
        self.aliased = _overlapping(list(self.tensors.values()))

    def _slot(self, module: str, site: str, groups: int | None = None) -> list[int] | None:
        """Segment ids of the mask at ``(module, site)``, laid out on first use split into
        ``groups`` equal parts (default 1); None if there is no such mask, or if it was laid
        out with another split than ``groups``."""
        key = (module, site)
        if key not in self.slots:
            mask = resolve_mask(self.model, module, site, create=False)
            if mask is None:
                return None
            parts, numel = groups or 1, mask.numel()
            segs = list(range(self.n_segs, self.n_segs + parts))
            self.slots[key] = [self.n_entries, numel, segs]
            self.tensors[key] = mask
            self.seg_of.append(torch.arange(numel) // (numel // parts) + self.n_segs)
            self.n_entries += numel
            self.n_segs += parts
        segs = self.slots[key][2]
        return segs if groups is None or len(segs) == groups else None

    def _filters(self, members, modules) -> None:
        terms = self.terms["filters"]
        for module, site in dict.fromkeys((m.module, m.site) for m in members):
            if site in _FILTER_SITES and not isinstance(modules[module], NORMS):
                for seg in self._slot(module, site) or ():
                    terms.add(seg, -1, 1.0)

    def _layer(self, terms: _Terms, name: str, factor: float) -> None:
        """``factor`` times the kept weight entries of layer ``name`` (``masks.kept_weights``)."""
        groups, kernel = _product_form(submodule(self.model, name))
        if groups == 0:  # no mask at all: every entry counts
            terms.constant += factor * kernel
            return
        outs = ins = None
        if groups is not None:
            outs = self._slot(name, "out", max(groups, 1))
            ins = self._slot(name, "in", groups) if groups > 0 else [-1] * len(outs or ())
        if outs is None or ins is None:  # not a product of mask counts: the exact way
            terms.exact.append((name, factor))
            return
        for out, inp in zip(outs, ins):
            terms.add(out, inp, factor * kernel)

    def _attention(self, terms, name, lq, lk, products) -> None:
        segs = {site: self._slot(name, site) for site in "qkvo"}  # None: unmasked
        terms.attention.append((name, float(lq), float(lk), products, segs))

    def _members(self, members) -> None:
        """Flat position and global unit id of every mask entry a unit owns."""
        pos, unit = [], []
        for g in self.groups:
            for m in g.members:
                pos.append(self.slots[(m.module, m.site)][0] + m.idxs.cpu())
                unit.append(self.offsets[g.name] + m.units.cpu())
        self.entry_pos = torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long)
        self.entry_unit = torch.cat(unit) if unit else torch.zeros(0, dtype=torch.long)

    # -- reading --------------------------------------------------------------------------------
    def _resolve(self) -> dict[tuple[str, str], Tensor | None]:
        return {k: resolve_mask(self.model, k[0], k[1], create=False) for k in self.slots}

    @staticmethod
    def _signature(tensors) -> tuple:
        return tuple((k, None if t is None else t.numel()) for k, t in tensors.items())

    def state(self) -> Tensor:
        """The current masks as one flat float64 vector of 0/1 (1: the entry is kept)."""
        tensors = self._resolve()
        if self._signature(tensors) != self.signature:  # masks replaced or resized: lay out anew
            self._build()
            tensors = self._resolve()
        self.tensors = tensors
        flat = [t.detach().reshape(-1).ne(0) for t in tensors.values()]
        if not flat:
            return torch.zeros(0, dtype=torch.float64)
        if len({t.device for t in flat}) == 1:
            return torch.cat(flat).cpu().double()
        return torch.cat([t.cpu() for t in flat]).double()

    def ids(self, units: list[tuple[str, int]]) -> Tensor:
        """Global ids of ``(group name, unit)`` pairs."""
        return torch.tensor([self.offsets[g] + u for g, u in units], dtype=torch.long)

    def after(self, state: Tensor, ids: Tensor) -> Tensor:
        """``state`` with every entry of units ``ids`` cleared."""
        if not len(ids):
            return state
        chosen = torch.zeros(self.n_units, dtype=torch.bool)
        chosen[ids] = True
        out = state.clone()
        out[self.entry_pos[chosen[self.entry_unit]]] = 0.0
        return out

    def count(self, kind: str, state: Tensor) -> float | int:
        """Filters, weights or MACs (``kind``) of the model with ``state`` as its masks."""
        terms = self.terms[kind]
        sums = torch.zeros(self.n_segs + 1, dtype=torch.float64)
        sums.index_add_(0, self.segment, state)
        sums[self.one] = 1.0
        total = terms.constant + float((terms.coef_t * sums[terms.a_t] * sums[terms.b_t]).sum())
        if terms.attention:
            values = sums.tolist()
            for name, lq, lk, products, segs in terms.attention:
                module = submodule(self.model, name)
                total += _attention_count(module, lq, lk, products, segs, values)
        if terms.exact:
            total += self._exact(terms.exact, state)
        return int(round(total)) if kind == "macs" else total

    def totals(self, state: Tensor) -> dict:
        return {kind: self.count(kind, state) for kind in KINDS}

    def _exact(self, layers: list[tuple[str, float]], state: Tensor) -> float:
        """Layers counted the exact way, their masks swapped to ``state`` meanwhile."""
        total = 0.0
        for name, factor in layers:
            keys = [k for k in ((name, "out"), (name, "in")) if k in self.slots]
            saved = {k: self.tensors[k].detach().clone() for k in keys}
            try:
                with torch.no_grad():
                    for k in keys:
                        start, numel, _ = self.slots[k]
                        keep = state[start : start + numel].view_as(saved[k])
                        self.tensors[k].copy_(saved[k] * keep.to(saved[k]))
                total += factor * kept_weights(submodule(self.model, name))
            finally:
                with torch.no_grad():
                    for k in keys:
                        self.tensors[k].copy_(saved[k])
        return total


def _product_form(module: nn.Module) -> tuple[int | None, float]:
    """``(groups, kernel)`` such that the layer keeps ``sum_g out_g * in_g * kernel`` entries;
    groups 0: unmasked (kernel is then every entry); -1: out mask only (kernel: entries per
    row); None: not of this form (counted the exact way)."""
    if isinstance(module, AdaptedLayer):
        if type(module.adapter).kept_entries is not Adapter.kept_entries:
            return None, 0.0
        shape = weight_shape(module.base)
        return module.adapter.groups, float(torch.Size(shape[2:]).numel())
    if not isinstance(module, nn.Linear | _ConvNd):
        return None, 0.0
    shape = weight_shape(module)
    mask = channel_mask_of(module, "weight")
    if mask is None:
        return 0, float(torch.Size(shape).numel())
    if type(mask).kept is not ChannelMask.kept:
        return None, 0.0
    if len(shape) == 1 or mask.mask_in is None:
        return -1, float(torch.Size(shape[1:]).numel())
    return mask.groups, float(torch.Size(shape[2:]).numel())


def _attention_count(module, lq, lk, products, segs, values) -> float:
    """``measure.attention_macs`` with the kept q/k/v/o counts read from segment sums."""
    e = float(module.embed_dim)
    kept = tuple(e if segs[s] is None else sum(values[i] for i in segs[s]) for s in "qkvo")
    return attention_macs(module, kept, lq, lk, products)


def _overlapping(tensors: list[Tensor]) -> bool:
    """Whether two of ``tensors`` share memory (then a tentative state written to one slot
    would be missed by the other: the exact path is used instead)."""
    spans = []
    for t in tensors:
        start = t.data_ptr()
        spans.append((t.device, start, start + t.numel() * t.element_size()))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    return any(a[0] == b[0] and b[1] < a[2] for a, b in zip(spans, spans[1:]))
