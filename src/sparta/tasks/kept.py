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
        self._ones: dict[tuple, Tensor] = {}

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
        if "stored" not in e:
            have = (None, None)
        else:
            have = (self.kept.get(e.get("rows")), self.kept.get(e.get("cols")))
        fresh = False
        for dim, want, kept in ((0, rows, have[0]), (1, cols, have[1])):
            if kept is not None:
                if self._same(want, kept, e["shape"][dim]):
                    continue  # the stored entries are the cut
                # pruned entries the cut keeps (or no cut): expand this side
                size = list(t.shape)
                size[dim] = e["shape"][dim]
                t, fresh = torch.zeros(size, dtype=t.dtype).index_copy_(dim, kept, t), True
            if want is not None:
                t, fresh = t.index_select(dim, want), True
        return t, fresh

    def mask_cut(self, key: str, want: Tensor | None) -> tuple[Tensor, bool]:
        """``(mask[want], keeps)`` of 1-D mask ``key`` (``None``: all of it); ``keeps``:
        whether it keeps every entry of ``want``. Read from its kept indices where they say
        (the mask keeps everything, or exactly ``want``, as where the plan cut what the mask
        pruned): the cut is then all ones (:meth:`ones`), and the mask is not read."""
        t, _ = self._read(key)
        kept = self.kept_of(key)
        n = t.shape[0] if want is None else want.shape[0]
        if kept.shape[0] == t.shape[0] or self._same(want, kept, t.shape[0]):
            return self.ones(n, t.dtype), True
        cut = t if want is None else t.index_select(0, want)
        return cut, bool(cut.all())

    def kept_of(self, key: str) -> Tensor:
        """The kept indices of 1-D mask ``key`` (those :func:`kept_indices` found, else found
        now and kept for the build)."""
        kept = self.kept.get(key)
        if kept is None:
            t, _ = self._read(key)
            kept = self.kept[key] = torch.from_numpy(np.flatnonzero(t.numpy()))
        return kept

    def ones(self, n: int, dtype: torch.dtype) -> Tensor:
        """A tensor of ``n`` ones (shared by the build; read, never written or kept)."""
        key = (n, dtype)
        t = self._ones.get(key)
        if t is None:
            t = self._ones[key] = torch.ones(n, dtype=dtype)
        return t

    def _same(self, want: Tensor | None, kept: Tensor, width: int) -> bool:
        """Whether index set ``want`` (``None``: all of ``range(width)``) is ``kept``; sets
        are compared once per pair: a plan's set and a mask's kept indices are shared by all
        the tensors of a layer."""
        if want is None:
            return kept.shape[0] == width
        if want is kept:
            return True
        key = (id(want), id(kept))
        if key not in self._equal:
            same = want.shape == kept.shape and bool(torch.equal(want, kept))
            self._equal[key] = (want, kept, same)
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
