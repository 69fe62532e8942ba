"""The task manifest's schema and the checks of a task's tensors against it.

A manifest may come from anyone (a task file): every field is checked for type and bounds
(names, shapes, dtypes, the adapter and its options by the adapter's own checks, input shapes)
before anything is built from it, and every tensor must match its entry and checksum, hold
finite values and, when only its kept channels are stored, fit its masks.
"""

from __future__ import annotations

import hashlib
import math
from itertools import chain, repeat

import torch
from torch import Tensor

from ..adapters.base import get_adapter
from ..errors import ConfigError, SpartaError
from ..inputs import spec_problem
from .plan import plan_problem

FORMAT = "sparta.task"
VERSION = 3
MANIFEST_KEY = "sparta.manifest"
CHECKSUM_KEY = "sparta.manifest.sha256"
#: File format 4 stores the manifest (schema unchanged: :data:`VERSION`) compressed: the JSON
#: text deflated (zlib) and base64-encoded under ``ZMANIFEST_KEY``, the SHA-256 of the text
#: under ``ZCHECKSUM_KEY``; ``MANIFEST_KEY`` then holds only :data:`STUB`, which readers of
#: formats 1-3 refuse as "version 4: upgrade sparta". Files with a plain manifest still load.
FILE_VERSION = 4
ZMANIFEST_KEY = "sparta.manifest.zlib"
ZCHECKSUM_KEY = "sparta.manifest.zlib.sha256"
STUB = '{"format":"sparta.task","version":4}'
STATS = ("running_mean", "running_var", "num_batches_tracked")
KINDS = ("param", "mask", "stat")
#: The "adapter" names of baselines (:mod:`sparta.tasks.baseline`): a plain model whose task
#: holds every trained tensor (kept entries only), so the base gives only the structure.
BASELINES = ("finetune", "fine-pruning")
MAX_TENSOR_ELEMENTS = 2**32  # the full (unpruned) shape of any one task tensor
MAX_RANK = 8
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
)}  # fmt: skip
_DTYPE_NAMES = set(_DTYPES)


class ArtifactError(ConfigError):
    """A task artifact is unreadable, inconsistent, or does not fit the given base."""


def digest(t: Tensor) -> str:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


# -- the manifest schema ---------------------------------------------------------------------------
_SCHEMA = {
    "format": str,
    "version": int,
    "adapter": dict,
    "adapted": list,
    "head": list,
    "masked": list,
    "tensors": dict,
    "base": dict,
    "counts": dict,
}


def check_manifest(m, path: str) -> None:
    """Raise :class:`ArtifactError` unless ``m`` follows the manifest schema and its bounds."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"{path!r} is not a sparta task (manifest format is not {FORMAT!r})")
    if not _int(m.get("version")) or not 1 <= m["version"] <= VERSION:
        raise ArtifactError(
            f"task file {path!r} has format version {_short(m.get('version'))}, but this "
            f"sparta reads version {VERSION} and older; upgrade sparta to load it"
        )
    for key, typ in _SCHEMA.items():
        if not isinstance(m.get(key), typ):
            raise ArtifactError(
                f"task file {path!r}: manifest field {key!r} is missing or not a {typ.__name__}"
            )
    problem = _schema_problem(m)
    if problem:
        raise ArtifactError(f"task file {path!r}: manifest does not follow the schema ({problem})")
    if "inputs" in m and (problem := spec_problem(m["inputs"])) is not None:
        raise ArtifactError(
            f"task file {path!r}: manifest field 'inputs' is not a usable input spec ({problem})"
        )
    if (m["version"] >= 3 or "plan" in m) and (problem := plan_problem(m, m["version"])):
        raise ArtifactError(f"task file {path!r}: its compact plan is malformed ({problem})")
    _check_adapter(m["adapter"], path, m["adapted"])


def _schema_problem(m: dict) -> str | None:
    names = m["adapted"] + m["head"]
    checks = [
        (isinstance(m["adapter"].get("name"), str), "adapter.name is not a string"),
        (isinstance(m["adapter"].get("options"), dict), "adapter.options is not a dict"),
        (_all_type(names, str), "adapted/head hold a non-string"),
        (len(set(names)) == len(names), "a layer is listed twice in adapted/head"),
        (_pairs_ok(m["masked"]), "masked is not a list of [module, tensor] names"),
        (isinstance(m["base"].get("sha256"), str), "base.sha256 is not a string"),
        (
            isinstance(m["base"].get("tensors"), dict)
            and _all_type(m["base"]["tensors"].values(), str),
            "base.tensors is not a dict of digests",
        ),
        (
            _int(m["counts"].get("learned_parameters")),
            "counts.learned_parameters is missing or not an integer >= 0",
        ),
        (_int(m["counts"].get("tensor_bytes", 0)), "counts.tensor_bytes is not an integer >= 0"),
        (  # absent from files written before the paper's accounting was recorded
            _int(m["counts"].get("learned_parameters_paper", 0)),
            "counts.learned_parameters_paper is not an integer >= 0",
        ),
    ]
    problem = next((why for ok, why in checks if not ok), None)
    if problem is None and not _entries_ok(list(m["tensors"].values())):
        bad = next(k for k, e in m["tensors"].items() if not _entry_ok(e))
        problem = f"tensor entry {_short(bad)} is malformed"
    return problem


def _all_type(values, typ: type) -> bool:
    """Every item of ``values`` is exactly a ``typ`` (one C-level pass: a manifest lists
    hundreds of tensors, and per-item Python checks cost milliseconds)."""
    return set(map(type, values)) <= {typ}


def _pairs_ok(value) -> bool:
    if not isinstance(value, list):
        return False
    if _all_type(value, list) and set(map(len, value)) <= {2}:
        return _all_type(chain.from_iterable(value), str)
    return all(
        isinstance(x, list) and len(x) == 2 and all(isinstance(s, str) for s in x) for x in value
    )


def _entries_ok(entries: list) -> bool:
    """:func:`_entry_ok` of every entry at once, in C-level passes (``map``, ``set``, ``zip``):
    ``False`` when any entry might fail it (the caller then finds which one, entry by entry).
    Never more lenient than :func:`_entry_ok`."""
    if not _all_type(entries, dict):
        return False
    shapes = _field(entries, "shape")
    stored = [(e["stored"], e.get("shape")) for e in entries if "stored" in e]
    try:  # the few distinct (kind, dtype, as, packed, stored?) combinations, checked once each
        combos = set(
            zip(
                _field(entries, "kind"),
                _field(entries, "dtype"),
                _field(entries, "as", "bool"),
                _field(entries, "packed", False),
                map(dict.__contains__, entries, repeat("stored")),
            )
        )
    except TypeError:  # an unhashable value
        return False
    return (
        all(_combo_ok(*c) for c in combos)
        and _all_type(_field(entries, "packed", False), bool)  # True == 1 in a set: types too
        and _all_type(_field(entries, "sha256"), str)
        and set(map(type, _field(entries, "rows"))) <= _NAME_TYPES
        and set(map(type, _field(entries, "cols"))) <= _NAME_TYPES
        and _shapes_ok(shapes)
        and _shapes_ok([s for s, _ in stored])
        and [len(s) for s, _ in stored] == [len(full) for _, full in stored]
    )


_NAME_TYPES = {str, type(None)}


def _field(entries: list[dict], key: str, default=None) -> list:
    return list(map(dict.get, entries, repeat(key), repeat(default)))


def _combo_ok(kind, dtype, as_, packed, stored: bool) -> bool:
    return (
        kind in KINDS
        and isinstance(dtype, str)
        and dtype in _DTYPES
        and isinstance(as_, str)
        and as_ in _DTYPES
        and (not packed or kind == "mask")
        and (kind != "mask" or (dtype == "bool" and not stored))
    )


def _shapes_ok(shapes: list) -> bool:
    """:func:`_shape_ok` of every item of ``shapes``, in bulk."""
    if not _all_type(shapes, list) or max(map(len, shapes), default=0) > MAX_RANK:
        return False
    flat = list(chain.from_iterable(shapes))
    return (
        _all_type(flat, int)
        and min(flat, default=0) >= 0
        and max(map(math.prod, shapes), default=0) <= MAX_TENSOR_ELEMENTS
    )


def _check_adapter(adapter: dict, path: str, adapted: list) -> None:
    """The adapter is a registered one and its options pass its own checks (a baseline's,
    :data:`BASELINES`, has no options and adapts no layer)."""
    if adapter["name"] in BASELINES:
        if adapter["options"] or adapted:
            raise ArtifactError(
                f"task file {path!r}: a {adapter['name']} baseline has no adapter options and "
                f"adapts no layer, but this one lists {len(adapter['options'])} option(s) and "
                f"{len(adapted)} adapted layer(s); the file was edited"
            )
        return
    try:
        get_adapter(adapter["name"]).resolve_options(dict(adapter["options"]))
    except (SpartaError, TypeError, ValueError) as exc:
        raise ArtifactError(f"task file {path!r}: its adapter does not load ({exc})") from None


def _entry_ok(e) -> bool:
    return (
        isinstance(e, dict)
        and e.get("kind") in KINDS
        and _shape_ok(e.get("shape"))
        and isinstance(e.get("dtype"), str)
        and e["dtype"] in _DTYPES
        and isinstance(e.get("as", "bool"), str)
        and e.get("as", "bool") in _DTYPES
        and isinstance(e.get("sha256"), str)
        and ("stored" not in e or (_shape_ok(e["stored"]) and len(e["stored"]) == len(e["shape"])))
        and isinstance(e.get("packed", False), bool)
        and (not e.get("packed") or (e["kind"] == "mask" and e["dtype"] == "bool"))
        and (e["kind"] != "mask" or (e["dtype"] == "bool" and "stored" not in e))
        and all(isinstance(e.get(k), str | None) for k in ("rows", "cols"))
    )


def _shape_ok(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= MAX_RANK
        and all(_int(s) for s in value)
        and math.prod(value) <= MAX_TENSOR_ELEMENTS
    )


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ints(value) -> bool:
    return isinstance(value, list) and all(_int(s) for s in value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- the tensors -----------------------------------------------------------------------------------
def check_listed(found, table: dict, path) -> None:
    """The tensor names ``found`` (in a header, or loaded) are exactly those ``table`` lists."""
    if set(found) != set(table):
        extra, missing = sorted(set(found) - set(table)), sorted(set(table) - set(found))
        raise ArtifactError(
            f"task {str(path)!r}: tensors do not match the manifest "
            f"(not listed: {extra[:3]}, absent: {missing[:3]})"
        )


def check_tensors(tensors: dict, manifest: dict, path) -> None:
    """Validate ``tensors`` against the manifest: keys, shapes, dtypes, checksums, finite
    values, and every compact entry against its masks (without expanding anything)."""
    table = manifest["tensors"]
    check_listed(tensors, table, path)
    for key, t in tensors.items():
        e = table[key]
        shape = e.get("stored", e["shape"])
        if list(t.shape) != shape or t.dtype != _DTYPES[e["dtype"]]:
            raise ArtifactError(
                f"task {str(path)!r}: tensor {key!r} is {list(t.shape)} {t.dtype}, the manifest "
                f"says {shape} {e['dtype']}"
            )
        if digest(t) != e["sha256"]:
            raise ArtifactError(f"task {str(path)!r} is corrupted: tensor {key!r} checksum differs")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(
                f"task {str(path)!r}: tensor {key!r} holds NaN or infinite values; a task's "
                "tensors must be finite (re-export it from a healthy model)"
            )
    check_fit(table, _mask_counts(tensors, table), path)


def _mask_counts(tensors: dict, table: dict) -> dict[str, tuple[list[int], int]]:
    """``{key: (shape, kept count)}`` of the bool masks among ``tensors``."""
    return {
        k: (list(t.shape), int(t.sum()))
        for k, t in tensors.items()
        if table.get(k, {}).get("kind") == "mask" and t.dtype == torch.bool
    }


def check_fit(table: dict, masks: dict[str, tuple], path) -> None:
    """Every compact entry of ``table`` (one with a ``stored`` shape) refers to masks among
    ``masks`` (``{key: (shape, kept count)}``) that fit its full shape, and stores exactly
    the entries they keep."""
    for key, e in table.items():
        if "stored" not in e:
            continue
        expected = list(e["shape"])
        for axis, side in enumerate(("rows", "cols")):
            name = e.get(side)
            if name is None:
                continue
            if name not in masks or table.get(name, {}).get("kind") != "mask":
                raise ArtifactError(f"task {str(path)!r}: {key!r} refers to no mask {name!r}")
            shape, count = masks[name]
            if len(expected) <= axis or list(shape) != [expected[axis]]:
                raise ArtifactError(
                    f"task {str(path)!r}: mask {name!r} does not fit {key!r} {e['shape']}"
                )
            expected[axis] = count
        if e["stored"] != expected:
            raise ArtifactError(
                f"task {str(path)!r}: {key!r} stores {e['stored']} entries, its masks keep "
                f"{expected}"
            )
