"""The tensors of a task file's body, decoded and checked in a few passes over the whole body
rather than a few Python calls per tensor (a ResNet-50 task holds ~530 tensors).

Each tensor is a view of the one buffer the body was read into (``body``, a uint8 tensor the
task owns); packed masks are views of one buffer of unpacked bits. Before any tensor is
returned, every one is checked against its manifest entry: its SHA-256 (over the bytes a
tensor of its dtype holds, as :func:`~sparta.tasks.manifest.digest` computes it), finite
values for floating tensors, bytes 0 or 1 for bool ones, and the kept counts of the masks
against the stored shapes of compact entries. Dtypes and shapes are right by construction:
:func:`~sparta.tasks.taskfile.inspect` checked the header against the manifest first.
"""

from __future__ import annotations

import hashlib
import math
from operator import methodcaller

import numpy as np
import torch
from torch import Tensor

from .manifest import _DTYPES, ArtifactError, check_fit

_hexdigest = methodcaller("hexdigest")
Span = tuple[int, int, str, dict, list[int]]  # start, stop (in the body), key, entry, stored shape


def decode_body(body: Tensor, layout: list[Span], manifest: dict, path: str) -> dict[str, Tensor]:
    """The checked tensors of ``body`` (uint8), laid out as ``layout`` says (body order)."""
    groups: dict[str, list[Span]] = {}
    for span in layout:
        groups.setdefault("packed" if span[3].get("packed") else span[3]["dtype"], []).append(span)
    packed = groups.pop("packed", [])
    raw = body.numpy()
    view = memoryview(raw)
    _check_digests(
        [s for g in groups.values() for s in g],
        [view[s[0] : s[1]] for g in groups.values() for s in g],
        path,
    )
    masks, counts = _unpack(raw, packed, path)
    _check_values(raw, groups, path)
    tensors = masks
    for name, spans in groups.items():
        tensors.update(_typed(body, spans, _DTYPES[name]))
    counts.update(
        {s[2]: int(tensors[s[2]].sum()) for s in groups.get("bool", ()) if s[3]["kind"] == "mask"}
    )  # masks of version 1 files: one byte per channel
    check_fit(manifest["tensors"], {k: (tensors[k].shape, n) for k, n in counts.items()}, path)
    return {k: tensors[k] for k in sorted(tensors)}


def _check_digests(spans: list[Span], data: list, path: str) -> None:
    """The SHA-256 of ``data[i]`` (bytes-like) is the one ``spans[i]``'s entry records. One
    C-level pass (``map``): a Python loop costs more than hashing a small tensor."""
    found = list(map(_hexdigest, map(hashlib.sha256, data)))
    if found != [s[3]["sha256"] for s in spans]:
        key = next(s[2] for s, h in zip(spans, found) if h != s[3]["sha256"])
        raise ArtifactError(f"task {path!r} is corrupted: tensor {key!r} checksum differs")


def _typed(body: Tensor, spans: list[Span], dtype: torch.dtype) -> dict[str, Tensor]:
    """``{key: tensor}`` for spans of one dtype: views of ``body`` when each starts at a
    multiple of the element size (as sparta writes them), else copies."""
    size = dtype.itemsize
    if any(s[0] % size for s in spans):  # not written by sparta: aligned copies
        return {k: body[a:b].clone().view(dtype).view(shape) for a, b, k, _, shape in spans}
    flat = body[: spans[-1][1]].view(dtype)  # starts at the body's start: offsets are absolute
    return _views(flat, [(s[0] // size, s[2], s[4]) for s in spans])


def _views(flat: Tensor, items: list[tuple[int, str, list[int]]]) -> dict[str, Tensor]:
    """``{key: contiguous view of flat at offset}`` for ``items`` ``(offset, key, shape)``
    (offsets in elements of ``flat``, a tensor of its own storage, offset 0)."""
    strides: dict[tuple, list[int]] = {}
    out = {}
    for offset, key, shape in items:
        shape = tuple(shape)
        stride = strides.get(shape)
        if stride is None:
            stride = strides[shape] = _contiguous_strides(shape)
        out[key] = flat.as_strided(shape, stride, offset)
    return out


def _contiguous_strides(shape: tuple) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_FINITE_WHY = "holds NaN or infinite values; a task's tensors must be finite (re-export it from "
_FINITE_WHY += "a healthy model)"


def _check_values(raw: np.ndarray, groups: dict[str, list[Span]], path: str) -> None:
    """Floating tensors hold finite values; bool tensors bytes 0 or 1 (any other byte is not a
    bool torch can compute with). One pass per dtype when its tensors lie back to back (as
    sparta writes them). NumPy, not torch: a torch op this small pays more to start its
    threads (milliseconds on a busy machine) than to run."""
    for name, spans in groups.items():
        dtype = _DTYPES[name]
        if not (dtype.is_floating_point or dtype == torch.bool):
            continue
        lo, hi = spans[0][0], spans[-1][1]
        if sum(b - a for a, b, *_ in spans) == hi - lo and not _bad(raw[lo:hi], dtype):
            continue
        bad = [k for a, b, k, *_ in sorted(spans, key=lambda s: s[2]) if _bad(raw[a:b], dtype)]
        if bad:
            why = _FINITE_WHY if dtype.is_floating_point else "holds bool bytes other than 0 and 1"
            raise ArtifactError(f"task {path!r}: tensor {bad[0]!r} {why}")


def _bad(data: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether the bytes ``data`` hold a non-finite ``dtype`` value (a bool byte not 0 or 1)."""
    if data.size == 0:
        return False
    if dtype == torch.bool:
        return bool(data.max() > 1)
    if dtype == torch.bfloat16:  # no NumPy type: exponent bits all set is inf or NaN
        return bool(((data.view(np.int16) & 0x7F80) == 0x7F80).any())
    return not bool(np.isfinite(data.view(_NUMPY[dtype])).all())


def _unpack(raw: np.ndarray, spans: list[Span], path: str) -> tuple[dict, dict]:
    """``({key: bool mask}, {key: kept count})`` of the packed masks (8 channels a byte),
    their checksums checked over the unpacked bits."""
    if not spans:
        return {}, {}
    lo, hi = spans[0][0], spans[-1][1]
    if hi - lo <= 2 * sum(b - a for a, b, *_ in spans) + 64:  # (nearly) back to back: one pass
        bits = np.unpackbits(raw[lo:hi])
        starts = [8 * (a - lo) for a, *_ in spans]
    else:
        parts = [np.unpackbits(raw[a:b]) for a, b, *_ in spans]
        bits = np.concatenate(parts)
        starts = np.cumsum([0] + [len(p) for p in parts[:-1]]).tolist()
    sizes = [math.prod(s[3]["shape"]) for s in spans]
    _check_digests(spans, [bits[o : o + n] for o, n in zip(starts, sizes)], path)
    counts = _counts(bits, starts, sizes)
    flags = torch.from_numpy(bits).view(torch.bool)
    masks = _views(flags, [(o, s[2], s[3]["shape"]) for s, o in zip(spans, starts)])
    return masks, {s[2]: c for s, c in zip(spans, counts)}


def _counts(bits: np.ndarray, starts: list[int], sizes: list[int]) -> list[int]:
    """The ones in ``bits[start : start + size]`` for each pair, in one ``reduceat`` pass (it
    sums between consecutive indices: the odd slots, between masks, are dropped; an empty
    slice gives the element at its index, hence the zero-size case)."""
    size = np.asarray(sizes, dtype=np.int64)
    begin = np.asarray(starts, dtype=np.int64)
    edges = np.stack([begin, begin + size], axis=1).reshape(-1)
    padded = np.concatenate((bits, np.zeros(1, dtype=bits.dtype)))  # every edge an index
    sums = np.add.reduceat(padded, edges, dtype=np.int64)[::2]
    return np.where(size == 0, 0, sums).tolist()
