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

from .manifest import check_fit


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
