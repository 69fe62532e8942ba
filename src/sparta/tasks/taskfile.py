"""Reading, checking and writing task files: a safetensors file whose metadata holds the JSON
manifest (see :mod:`sparta.tasks.artifact`), read without ever unpickling. Since file format 4
the manifest is stored deflated (:func:`manifest_meta`, :func:`manifest_text`: a ResNet-50
task's is ~130 KB of JSON, mostly tensor names and checksums, ~22 KB deflated) and the header
lists one tensor per dtype, the task's tensors back to back in an order the manifest gives
(:func:`serialize`, :func:`_blob_layout`), not ~530 named entries (~50 KB): each tensor is still
checked against its own manifest entry and checksum.

A task file may come from anyone, so nothing in it is trusted before it is checked: only a
regular file is opened (never a pipe or a device, which could block or never end), its size
and the safetensors header are checked before the body is read, the manifest must follow the
schema and every tensor must match its manifest entry (:mod:`.manifest`). Writing is
deterministic: the same task gives the same bytes in every process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import stat
import zlib
from itertools import accumulate, chain
from operator import mul

import numpy as np
import torch
from torch import Tensor

from ..utils import gc_paused
from .kept import compact, expand, full_tensors, kept_indices  # noqa: F401  (re-exported)
from .manifest import (  # noqa: F401  (re-exported: the names of the task file format)
    _DTYPES,
    CHECKSUM_KEY,
    FORMAT,
    KINDS,
    MANIFEST_KEY,
    STATS,
    STUB,
    VERSION,
    ZCHECKSUM_KEY,
    ZMANIFEST_KEY,
    ArtifactError,
    _all_type,
    _field,
    _ints,
    _short,
    check_fit,
    check_listed,
    check_manifest,
    check_tensors,
    digest,
)
from .taskbody import Span, decode_body

MAX_FILE_BYTES = 2**30  # a task holds adapters, norms and a head: megabytes, not gigabytes
MAX_HEADER_BYTES = 2**24
_CODES = {  # safetensors dtype codes
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
_SIZES = {code: _DTYPES[name].itemsize for name, code in _CODES.items()}
_STUB_SHA256 = hashlib.sha256(STUB.encode()).hexdigest()


# -- writing ---------------------------------------------------------------------------------------
def serialize(tensors: dict[str, Tensor], meta: dict[str, str]) -> bytes:
    """safetensors bytes with a deterministic layout: header keys sorted, tensors ordered by
    element size (largest first, as safetensors aligns them), dtype, then name.
    ``safetensors.save`` writes the metadata in hash-map order, which differs from one process
    to the next. With a compressed manifest (file format 4, :func:`manifest_meta`) the header
    lists one tensor per dtype (:func:`blob_name`): the task's tensors of that dtype back to
    back, in this order, which the reader derives from the manifest (:func:`_blob_layout`)."""
    codes = {k: _CODES[str(t.dtype).removeprefix("torch.")] for k, t in tensors.items()}
    order = sorted(tensors, key=lambda k: _order_key(k, codes[k]))
    header: dict = {"__metadata__": dict(sorted(meta.items()))}
    blobs = ZMANIFEST_KEY in meta
    chunks, offset = [], 0
    for key in order:
        t = tensors[key].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        code, shape, start = codes[key], list(t.shape), offset
        if blobs:
            key, blob = blob_name(code), header.get(blob_name(code))
            shape = [t.numel() + (0 if blob is None else blob["shape"][0])]
            start = offset if blob is None else blob["data_offsets"][0]
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [start, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the body starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def blob_name(code: str) -> str:
    """The header name of a format 4 file's tensor of all the task's tensors of dtype ``code``."""
    return f"sparta.tensors.{code}"


def _order_key(key: str, code: str) -> tuple:
    """Where a tensor (file dtype ``code``) goes in a file body: by element size (largest
    first: each starts aligned), dtype (a format 4 dtype's tensors back to back), name."""
    return -_SIZES[code], code, key


def manifest_meta(manifest: dict) -> dict[str, str]:
    """The safetensors metadata of a task file holding ``manifest`` (file format 4): its JSON
    text (sorted keys, no spaces) deflated and base64-encoded, the text's SHA-256, and the stub
    older readers refuse (see :data:`~.manifest.ZMANIFEST_KEY`). About 6x smaller than the
    text, which is mostly tensor names and checksums: a ResNet-50 task's header goes from
    ~200 KB to ~70 KB (the tensors' own safetensors entries are the rest)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    packed = base64.b64encode(zlib.compress(text.encode(), 6)).decode("ascii")
    return {
        MANIFEST_KEY: STUB,
        CHECKSUM_KEY: _STUB_SHA256,
        ZMANIFEST_KEY: packed,
        ZCHECKSUM_KEY: hashlib.sha256(text.encode()).hexdigest(),
    }


def pack_masks(tensors: dict[str, Tensor], manifest: dict) -> dict[str, Tensor]:
    """Tensors as written to the file: masks flagged ``packed`` as 8 channels per byte."""
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if manifest["tensors"][key].get("packed"):
            t = torch.from_numpy(np.packbits(t.numpy().astype(bool)))
        out[key] = t
    return out


# -- reading ---------------------------------------------------------------------------------------
def read_task(path, max_bytes: int = MAX_FILE_BYTES) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, manifest)`` of task file ``path``: its size and header are checked before
    the body is read, the file is read once (straight into the tensors' buffer) and parsed
    once, and every tensor is checked (:func:`decode_body`). The garbage collector is paused
    meanwhile (:func:`~sparta.utils.gc_paused`: parsing the manifest makes thousands of
    small objects, none of them cyclic garbage)."""
    with gc_paused():
        return _read_task(path, max_bytes)


def _read_task(path, max_bytes: int) -> tuple[dict[str, Tensor], dict]:
    if not isinstance(path, str | os.PathLike):
        raise ArtifactError(
            f"expected the path of a task file (str or pathlib.Path), got {type(path).__name__}"
        )
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ArtifactError(f"cannot open task file {name!r}: {reason}") from None
    try:
        size = _checked_size(fd, name, max_bytes)
        prefix = _read(fd, min(9, size), name)
        n = header_length(prefix, size, name)
        prefix += _read(fd, 8 + n - len(prefix), name)
        manifest, layout = inspect(prefix, size, name)  # header and manifest, before the body
        body = torch.empty(size - len(prefix), dtype=torch.uint8)
        _read_into(fd, body.numpy(), name)
        if _read(fd, 1, name, exact=False):
            raise ArtifactError(f"task file {name!r} grew while it was read; try again")
    finally:
        os.close(fd)
    return decode_body(body, layout, manifest, name), manifest


def parse_task(data: bytes, path: str = "<bytes>") -> tuple[dict[str, Tensor], dict]:
    """``(tensors, manifest)`` of the task file bytes ``data``, checked as :func:`read_task`."""
    n = header_length(data[:9], len(data), path)
    manifest, layout = inspect(data[: 8 + n], len(data), path)
    body = torch.empty(len(data) - 8 - n, dtype=torch.uint8)
    body.numpy()[:] = np.frombuffer(data, np.uint8, offset=8 + n)
    return decode_body(body, layout, manifest, path), manifest


def _checked_size(fd: int, name: str, max_bytes: int) -> int:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise ArtifactError(
            f"{name!r} is {kind} (a pipe, socket or device is never read); a task is one "
            "regular .safetensors file"
        )
    if info.st_size > max_bytes:
        raise ArtifactError(
            f"task file {name!r} is {info.st_size:,} bytes, over the limit of {max_bytes:,}; "
            "a task file holds adapters, norms and a head (pass max_bytes= to allow more)"
        )
    return info.st_size


def _read(fd: int, n: int, name: str, exact: bool = True) -> bytes:
    chunks, left = [], n
    try:
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise ArtifactError(f"cannot read task file {name!r}: {exc.strerror or exc}") from None
    if exact and left > 0:
        raise ArtifactError(f"task file {name!r} shrank while it was read; try again")
    return b"".join(chunks)


def _read_into(fd: int, buffer: np.ndarray, name: str) -> None:
    """Fill ``buffer`` from ``fd`` (no intermediate copy)."""
    view, done = memoryview(buffer), 0
    with io.FileIO(fd, closefd=False) as f:
        try:
            while done < len(view):
                got = f.readinto(view[done : done + (1 << 24)])
                if not got:
                    raise ArtifactError(f"task file {name!r} shrank while it was read; try again")
                done += got
        except OSError as exc:
            raise ArtifactError(f"cannot read task file {name!r}: {exc.strerror or exc}") from None


def header_length(prefix: bytes, size: int, path: str) -> int:
    """The safetensors header length in the first 8 bytes (``prefix``: the first 9 or more
    bytes of a file of ``size`` bytes), checked against the file size."""
    # A safetensors file has its JSON header at byte 8; a pickle starts with the 0x80 protocol
    # opcode, a torch.save file is a zip. Byte 0 alone is not enough: it is the low byte of
    # the header length, 0x80 for one length in 256.
    if prefix[8:9] != b"{" and (prefix[:1] == b"\x80" or prefix[:4] == b"PK\x03\x04"):
        raise ArtifactError(
            f"{path!r} is a pickle / torch.save file, not a sparta task; sparta never "
            "unpickles (it could run arbitrary code). Re-export the task with "
            "sparta.export(...).save()"
        )
    if size < 8 or len(prefix) < 8:
        raise ArtifactError(f"task file {path!r} is truncated ({size} bytes)")
    n = int.from_bytes(prefix[:8], "little")
    if n > size - 8:
        raise ArtifactError(
            f"task file {path!r} is truncated or corrupted: header says {n} bytes, "
            f"file has {size - 8} after the length"
        )
    if n > MAX_HEADER_BYTES or n < 2:
        raise ArtifactError(
            f"task file {path!r}: header length {n:,} is not between 2 and {MAX_HEADER_BYTES:,}"
        )
    return n


def inspect(prefix: bytes, size: int, path: str) -> tuple[dict, list[Span]]:
    """``(manifest, layout)`` from the first ``8 + header length`` bytes of a file of ``size``
    bytes: everything is checked that can be without reading the tensors. ``layout`` lists
    where each tensor lies in the body (see :func:`_check_layout`)."""
    n = header_length(prefix, size, path)
    try:
        header = json.loads(prefix[8 : 8 + n].decode("utf-8"))
        meta = header.pop("__metadata__")
        if not isinstance(meta, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise ArtifactError(
            f"{path!r} is not a sparta task file (no readable safetensors header with a "
            "sparta manifest), or it is corrupted"
        ) from None
    manifest = read_manifest(meta, path)
    if ZMANIFEST_KEY in meta:  # file format 4: one tensor per dtype
        return manifest, _blob_layout(header, manifest, size - 8 - n, path)
    return manifest, _check_layout(header, manifest, size - 8 - n, path)


def read_manifest(meta: dict, path: str) -> dict:
    text = manifest_text(meta, path)
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"task file {path!r} has an unreadable manifest: {exc}") from None
    check_manifest(manifest, path)
    return manifest


def manifest_text(meta: dict, path: str = "<bytes>") -> str:
    """The manifest's JSON text in safetensors metadata ``meta``: compressed (format 4: the
    plain entry must then be the stub, and the text inflates to at most ``MAX_HEADER_BYTES``,
    so a crafted stream cannot exhaust memory) or plain (formats 1-3), its checksum checked."""
    text = meta.get(MANIFEST_KEY)
    if not isinstance(text, str):
        raise ArtifactError(f"{path!r} holds no {MANIFEST_KEY!r}: not a sparta task file")
    checksum = meta.get(CHECKSUM_KEY)
    if ZMANIFEST_KEY in meta or ZCHECKSUM_KEY in meta:
        if text != STUB or checksum != _STUB_SHA256:
            raise ArtifactError(
                f"task file {path!r} holds a compressed manifest and a plain one; a format 4 "
                f"file's {MANIFEST_KEY!r} is {STUB}, with its checksum (the file was edited)"
            )
        text, checksum = _inflate(meta.get(ZMANIFEST_KEY), path), meta.get(ZCHECKSUM_KEY)
    if hashlib.sha256(text.encode()).hexdigest() != checksum:
        raise ArtifactError(f"task file {path!r} is corrupted: manifest checksum differs")
    return text


def _inflate(packed, path: str) -> str:
    """The text of a compressed manifest (base64 of zlib), at most ``MAX_HEADER_BYTES``."""
    stream = zlib.decompressobj()
    try:
        raw = base64.b64decode(packed, validate=True) if isinstance(packed, str) else None
        data = b"" if raw is None else stream.decompress(raw, MAX_HEADER_BYTES + 1)
        text = data.decode("utf-8") if stream.eof and not stream.unused_data else None
    except (binascii.Error, ValueError, zlib.error):  # (UnicodeDecodeError is a ValueError)
        data, text = b"", None
    if len(data) > MAX_HEADER_BYTES or stream.unconsumed_tail:
        raise ArtifactError(
            f"task file {path!r}: its compressed manifest inflates to more than "
            f"{MAX_HEADER_BYTES:,} bytes (the limit on a manifest); the file was crafted"
        )
    if text is None:
        raise ArtifactError(
            f"task file {path!r} is corrupted: its compressed manifest ({ZMANIFEST_KEY!r}) is "
            "not base64 of a complete zlib stream of UTF-8 text"
        )
    return text


def _file_shapes(entries: list[dict]) -> tuple[list[list[int]], list[str]]:
    """``(shapes, dtype codes)`` of manifest entries as a file stores them: the kept entries,
    or the packed bytes of a mask."""
    shapes = [
        [(math.prod(e["shape"]) + 7) // 8] if e.get("packed") else e.get("stored", e["shape"])
        for e in entries
    ]
    codes = ["U8" if e.get("packed") else _CODES[e["dtype"]] for e in entries]
    return shapes, codes


def _blob_layout(header: dict, manifest: dict, body: int, path: str) -> list[Span]:
    """The spans of a format 4 file's tensors, from its manifest alone (its tensors of each
    dtype back to back, in :func:`_order_key` order), after checking that the header lists
    exactly those per-dtype tensors and that they tile the body."""
    keys = list(manifest["tensors"])
    entries = list(manifest["tensors"].values())
    shapes, codes = _file_shapes(entries)
    # In C-level passes (map, zip, accumulate): a ResNet-50 task holds ~530 tensors.
    order = sorted(zip(map(_SIZES.__getitem__, codes), codes, keys, entries, shapes))
    order.sort(key=lambda row: -row[0])  # stable: by size (largest first), then code, name
    counts = list(map(math.prod, [row[4] for row in order]))
    stops = list(accumulate(map(mul, counts, [row[0] for row in order])))
    starts = [0, *stops[:-1]]
    layout = list(zip(starts, stops, *list(zip(*order))[2:])) if order else []
    expected, offset, first = {}, stops[-1] if stops else 0, 0
    for last, row in enumerate(order):  # one blob per run of a code (a few)
        if last + 1 == len(order) or order[last + 1][1] != row[1]:
            expected[blob_name(row[1])] = {
                "dtype": row[1],
                "shape": [sum(counts[first : last + 1])],
                "data_offsets": [starts[first], stops[last]],
            }
            first = last + 1
    if header != expected or offset != body:
        odd = sorted(set(header) ^ set(expected)) or [
            k for k in sorted(expected) if header[k] != expected[k]
        ]
        found = _short(header.get(odd[0])) if odd else f"a body of {body:,} bytes"
        want = _short(expected.get(odd[0])) if odd else f"{offset:,}"
        raise ArtifactError(
            f"task file {path!r}: its safetensors header does not match its manifest (file "
            f"format 4 stores one tensor per dtype): {odd[0] if odd else 'the body'} is "
            f"{found}, expected {want}"
        )
    return layout


def stored_tensors(data: bytes, path: str = "<bytes>") -> dict[str, Tensor]:
    """The tensors of task file bytes ``data`` by manifest key, as stored (kept entries only,
    masks packed as bytes), for either layout; copies, checked no further than the header."""
    n = header_length(data[:9], len(data), path)
    manifest, layout = inspect(data[: 8 + n], len(data), path)
    body = torch.frombuffer(bytearray(data[8 + n :]) or bytearray(1), dtype=torch.uint8)
    out = {}
    for start, stop, key, e, shape in layout:
        dtype = torch.uint8 if e.get("packed") else _DTYPES[e["dtype"]]
        out[key] = body[start:stop].clone().view(dtype).view(shape)
    return out


def _check_layout(header: dict, manifest: dict, body: int, path: str) -> list[Span]:
    """The header's tensors are the manifest's, at its dtypes and shapes, and tile the body
    exactly (no gap, no overlap). Returns their spans, in body order. Checked in bulk passes
    (whole-list comparisons); the entry-by-entry loop runs only to name what is wrong."""
    table = manifest["tensors"]
    check_listed(header, table, path)
    keys, found = list(header), list(header.values())
    entries = [table[k] for k in keys]
    shapes, codes = _file_shapes(entries)  # as in the file
    offsets = _field(found, "data_offsets") if _all_type(found, dict) else []
    if not (
        offsets
        and _field(found, "dtype") == codes
        and _field(found, "shape") == shapes
        and _all_type(offsets, list)
        and set(map(len, offsets)) <= {2}
        and _all_type(flat := list(chain.from_iterable(offsets)), int)
        and min(flat, default=0) >= 0
        and [b - a for a, b in offsets] == [math.prod(s) * _SIZES[c] for s, c in zip(shapes, codes)]
    ):
        for key, h, e, shape, code in zip(keys, found, entries, shapes, codes):
            _check_entry(key, h, e, shape, code, path)  # raises for the first bad entry
        if found:  # never reached (the bulk checks are the entry checks); never trust it
            raise ArtifactError(f"task {path!r}: its safetensors header is malformed")
    layout = sorted(zip([o[0] for o in offsets], [o[1] for o in offsets], keys, entries, shapes))
    end = 0
    for start, stop, *_ in layout:
        if start != end:
            break
        end = stop
    if end != body:
        raise ArtifactError(
            f"task file {path!r} is truncated or corrupted: its tensors cover {end:,} of the "
            f"{body:,} bytes after the header (or overlap)"
        )
    return layout


def _check_entry(key: str, h, e: dict, shape: list[int], code: str, path: str) -> None:
    offsets = h.get("data_offsets") if isinstance(h, dict) else None
    if (
        not isinstance(h, dict)
        or h.get("dtype") != code
        or h.get("shape") != shape
        or not _ints(offsets)
        or len(offsets) != 2
        or offsets[1] - offsets[0] != math.prod(shape) * _SIZES[code]
    ):
        raise ArtifactError(
            f"task {path!r}: tensor {key!r} is stored as {_short(h)}, the manifest says "
            f"{shape} {e['dtype']}" + (" packed" if e.get("packed") else "")
        )
