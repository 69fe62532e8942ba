"""A task's compact entries (only the kept rows/columns of a pruned tensor are stored) and
their full-size form, entries of pruned channels as zeros.

The kept indices of all masks come from one ``flatnonzero`` over the masks side by side. The
expansion stays one small ``index_copy_`` per entry: fusing them into a few large torch ops
was measured slower on a busy 2-core machine (large ops start torch's worker threads, which
then wait for a core), and NumPy needs a conversion call per tensor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .manifest import ArtifactError, check_fit


def kept_indices(tensors: dict, table: dict, path) -> dict[str, Tensor]:
    """``{mask key: indices of its kept entries}`` for the masks compact entries refer to;
    checks that every compact entry fits them (:func:`~.manifest.check_fit`)."""
    names = {e.get(side) for e in table.values() if "stored" in e for side in ("rows", "cols")}
    masks = {
        n: tensors[n]
        for n in sorted(names - {None})
        if n in tensors and tensors[n].dtype == torch.bool
    }
    flat = [n for n, m in masks.items() if m.dim() == 1]
    kept = dict(zip(flat, _nonzero_each([masks[n] for n in flat])))
    counts = {
        n: (list(m.shape), kept[n].shape[0] if n in kept else int(m.sum()))
        for n, m in masks.items()
    }
    check_fit(table, counts, path)
    return kept


def _nonzero_each(masks: list[Tensor]) -> list[Tensor]:
    """``[m.nonzero().flatten() for m in masks]`` (1-D bool masks), in one pass over all."""
    if not masks:
        return []
    sizes = np.array([m.shape[0] for m in masks])
    starts = np.cumsum(sizes) - sizes
    found = np.flatnonzero(torch.cat(masks).numpy())
    owner = np.searchsorted(starts, found, side="right") - 1  # empty masks share a start
    counts = np.bincount(owner, minlength=len(masks)).tolist()
    return list(torch.from_numpy(found - starts[owner]).split(counts))


def full_tensors(tensors: dict, table: dict, path) -> dict[str, Tensor]:
    """The task's tensors at full size, entries of pruned channels as zeros (tensors stored
    whole are returned as they are)."""
    kept = kept_indices(tensors, table, path)
    out = {}
    for key, t in tensors.items():
        e = table[key]
        if "stored" in e:
            rows, cols = (kept.get(e.get(side)) for side in ("rows", "cols"))
            t = expand(t, e["shape"], rows, cols)
        out[key] = t
    return out


def compact(t: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    if rows is not None:
        t = t[rows]
    return t if cols is None else t[:, cols]


def expand(t: Tensor, shape: list[int], rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """Inverse of :func:`compact`, pruned entries as zeros (``rows``/``cols``: kept indices)."""
    if cols is not None:
        t = torch.zeros(t.shape[0], *shape[1:], dtype=t.dtype).index_copy_(1, cols, t)
    if rows is not None:
        t = torch.zeros(shape, dtype=t.dtype).index_copy_(0, rows, t)
    return t


class Stored(dict):
    """A task's tensors for one build, read where they are cut: ``store[key]`` is the tensor at
    full size (expanded once, on first use), :meth:`cut` its kept rows/columns, taken from the
    stored entries directly when the cut keeps exactly the entries stored (the usual case: the
    plan keeps what the masks keep), and expanded only where it keeps an entry not stored."""

    def __init__(self, tensors: dict, table: dict, path):
        super().__init__()
        self.stored, self.table, self.path = tensors, table, path
        self.kept = kept_indices(tensors, table, path)
        self._equal: dict[tuple[int, int], tuple] = {}  # holds the pair: ids are not reused

    def __missing__(self, key: str) -> Tensor:
        t, e = self._read(key)
        if "stored" in e:
            rows, cols = (self.kept.get(e.get(side)) for side in ("rows", "cols"))
            t = expand(t, e["shape"], rows, cols)
        self[key] = t
        return t

    def cut(self, key: str, rows: Tensor | None, cols: Tensor | None) -> tuple[Tensor, bool]:
        """``(full[rows][:, cols], fresh)`` (``None``: all) of tensor ``key``; ``fresh``: a
        new tensor (else it shares the task's storage and must be copied before it is kept)."""
        t, e = self._read(key)
        have = (None, None)
        if "stored" in e:
            have = tuple(self.kept.get(e.get(side)) for side in ("rows", "cols"))
        fresh = False
        for dim, want, kept in ((0, rows, have[0]), (1, cols, have[1])):
            if kept is not None and want is not None and self._same(want, kept):
                continue  # the stored entries are the cut
            if kept is not None:  # pruned entries the cut keeps (or no cut): expand this side
                size = list(t.shape)
                size[dim] = e["shape"][dim]
                t, fresh = torch.zeros(size, dtype=t.dtype).index_copy_(dim, kept, t), True
            if want is not None:
                t, fresh = t.index_select(dim, want), True
        return t, fresh

    def _same(self, a: Tensor, b: Tensor) -> bool:
        """Whether index sets ``a`` and ``b`` are equal (compared once per pair: a plan's
        set and a mask's kept indices are shared by all tensors of a layer)."""
        key = (id(a), id(b))
        if key not in self._equal:
            same = a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
            self._equal[key] = (a, b, same)
        return self._equal[key][2]

    def _read(self, key: str) -> tuple[Tensor, dict]:
        """The stored tensor of ``key`` (its shape checked: a task's tensors may have been
        replaced since it was loaded) and its entry."""
        t, e = self.stored[key], self.table[key]
        if list(t.shape) != e.get("stored", e["shape"]):
            raise ArtifactError(
                f"task {str(self.path)!r}: tensor {key!r} is {list(t.shape)}, its manifest "
                f"says {e.get('stored', e['shape'])}; the task was edited after loading"
            )
        return t, e
