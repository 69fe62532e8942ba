"""The per-task artifact: what a task learned, in one safetensors file with a JSON manifest.

A task is the part of a wrapped (and possibly pruned) model that the shared base does not hold:
every trainable tensor (adapters, biases, norm affine parameters, the head), every channel mask
(stored as packed bits) and the BatchNorm running statistics. Entries of pruned channels are not
stored at all. Keys are the wrapped model's
``state_dict`` keys. The manifest records the adapter configuration, which layers were adapted
and masked, a SHA-256 fingerprint of the frozen base tensors, a checksum of every stored tensor
and the counts, and (optionally) the shapes of an example input, so that the compact model can be
built without the caller passing one. Loading never unpickles (design.md, style rule 5).

Format history: version 1 stored masks as one byte per channel and BatchNorm statistics in full;
version 2 packs masks into bits and stores statistics of kept channels only. Both are read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..adapters.attention import AdaptedWeight
from ..adapters.base import Adapter, get_adapter
from ..adapters.layer import AdaptedLayer
from ..errors import ConfigError
from ..inputs import check_spec, input_spec
from ..io import atomic_write
from ..measure import learned_parameters
from ..pruning.masks import ChannelMask, ensure_masks, resolve_mask

FORMAT = "sparta.task"
VERSION = 2
MANIFEST_KEY = "sparta.manifest"
CHECKSUM_KEY = "sparta.manifest.sha256"
STATS = ("running_mean", "running_var", "num_batches_tracked")
KINDS = ("param", "mask", "stat")
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
)}  # fmt: skip


class ArtifactError(ConfigError):
    """A task artifact is unreadable, inconsistent, or does not fit the given base."""


# -- classifying a wrapped model's tensors -------------------------------------------------------
def _is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(m, AdaptedLayer | AdaptedWeight) for m in model.modules())


def _task_kinds(model: nn.Module) -> dict[str, str]:
    """``{state_dict key: kind}`` for every tensor the task owns (see the module docstring)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    kinds: dict[str, str] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, Adapter | ChannelMask):
            kinds.update(
                {
                    prefix + b: "mask"
                    for b in getattr(m, "mask_names", ("mask_out", "mask_in"))
                    if m._buffers.get(b) is not None
                }
            )
        if isinstance(m, nn.modules.batchnorm._NormBase):
            kinds.update({prefix + b: "stat" for b in STATS if m._buffers.get(b) is not None})
        for pname, p in m._parameters.items():
            if p is not None and id(p) in trainable:
                kinds[prefix + pname] = "param"
    keys = set(model.state_dict(keep_vars=True))
    return {k: v for k, v in kinds.items() if k in keys}


def _base_names(model: nn.Module) -> dict[str, str]:
    """``{wrapped state_dict key: base name}`` for every key, e.g. ``x.base.weight -> x.weight``
    and ``a.parametrizations.w.original -> a.w``; keys with no base counterpart are left out."""
    adapted = [n for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]
    out = {}
    for key in model.state_dict(keep_vars=True):
        parts = key.split(".")
        if "parametrizations" in parts:
            i = parts.index("parametrizations")
            if parts[i + 2 :] != ["original"]:
                continue  # a parametrisation's own state (adapter, mask): not the base's
            parts = parts[:i] + [parts[i + 1]]
        name = ".".join(parts)
        for a in adapted:
            pre = f"{a}." if a else ""
            if name.startswith(pre + "adapter."):
                name = None
                break
            if name.startswith(pre + "base."):
                name = pre + name[len(pre) + len("base.") :]
                break
        if name is not None:
            out[key] = name
    return out


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    """Names and types of the base's modules, seen through adapters and parametrisations."""
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    out = []
    for name, m in model.named_modules():
        parts = name.split(".") if name else []
        if "parametrizations" in parts:
            continue
        inner = next((a for a in adapted if a == "" or name.startswith(a + ".")), None)
        if inner is not None and name != inner:
            sub = name[len(inner) + 1 :] if inner else name
            if sub != "base" and not sub.startswith("base."):
                continue  # adapter modules
            name = inner + sub[len("base") :] if inner else sub[len("base.") :]
            if name == inner:
                continue  # the AdaptedLayer itself already stands for its base
        if isinstance(m, AdaptedLayer):
            m = m.base
        cls = type(m)
        while cls.__name__.startswith("Parametrized") and cls.__bases__:
            cls = cls.__bases__[0]  # torch's generated class for a parametrised module
        out.append((name, f"{cls.__module__}.{cls.__qualname__}"))
    return sorted(out)


def _digest(t: Tensor) -> str:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def _frozen(model: nn.Module, names=None) -> dict[str, Tensor]:
    """``{base name: tensor}`` of the frozen base tensors (wrapped model) or of ``names``."""
    sd = model.state_dict()
    if _is_wrapped(model):
        task, mapping = _task_kinds(model), _base_names(model)
        frozen = {mapping[k]: v for k, v in sd.items() if k not in task and k in mapping}
    else:
        frozen = dict(sd)
    if names is not None:
        frozen = {n: frozen[n] for n in names if n in frozen}
    return frozen


def base_digests(model: nn.Module, names=None) -> dict[str, str]:
    """``{base name: "shape|dtype|sha256"}`` of the frozen base tensors."""
    return {
        n: f"{list(t.shape)}|{str(t.dtype).removeprefix('torch.')}|{_digest(t)}"
        for n, t in sorted(_frozen(model, names).items())
    }


def fingerprint(model: nn.Module, names=None) -> str:
    """SHA-256 over the frozen base tensors (name, shape, dtype, bytes) and module structure.

    On a wrapped model the frozen tensors are found by themselves (named as in the plain base:
    ``x.base.weight -> x.weight``, ``a.parametrizations.w.original -> a.w``). On a plain base
    pass the task (or the base names it lists, ``task.manifest["base"]["tensors"]``) as
    ``names``, so the tensors the task replaces are left out:
    ``fingerprint(plain_base, task) == fingerprint(wrapped_model) == task.fingerprint``.
    """
    if isinstance(names, Task):
        names = names.manifest["base"]["tensors"]
    if names is None and not _is_wrapped(model):
        raise ConfigError(
            "fingerprint of a plain (unwrapped) model needs names=<the Task> to know which "
            "tensors the task replaces; or call it on the wrapped model"
        )
    digests = base_digests(model, names)
    if names is not None and len(digests) != len(list(names)):
        missing = sorted(set(names) - set(digests))[:3]
        raise ArtifactError(f"the model has no tensor(s) {', '.join(missing)} of the base")
    return _combine(digests, model)


def _combine(digests: dict[str, str], model: nn.Module) -> str:
    text = json.dumps([sorted(digests.items()), _structure(model)])
    return hashlib.sha256(text.encode()).hexdigest()


# -- the task ------------------------------------------------------------------------------------
@dataclass
class Task:
    """What one task learned: ``tensors`` (state_dict keys -> tensors) and ``manifest``."""

    tensors: dict[str, Tensor]
    manifest: dict
    _full: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def adapter(self) -> str:
        return self.manifest["adapter"]["name"]

    @property
    def options(self) -> dict:
        return dict(self.manifest["adapter"]["options"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["base"]["sha256"]

    def full_tensors(self) -> dict[str, Tensor]:
        """Tensors at the model's shapes (entries of pruned channels, not stored, as zeros);
        cached until a tensor is replaced or edited in place."""
        key = self._full_key()
        if self._full is None or self._full[0] != key:
            self._full = (key, _full_tensors(self.tensors, self.manifest["tensors"], "<task>"))
        return self._full[1]

    def _full_key(self) -> list:
        return [(k, id(t), t._version) for k, t in self.tensors.items()]

    def to_bytes(self) -> bytes:
        """The file contents :meth:`save` writes."""
        _check_tensors(self.tensors, self.manifest, "<task>")
        text = json.dumps(self.manifest, sort_keys=True)
        meta = {MANIFEST_KEY: text, CHECKSUM_KEY: hashlib.sha256(text.encode()).hexdigest()}
        return st_save(_pack_masks(self.tensors, self.manifest), meta)

    def save(self, path) -> int:
        """Write the task atomically to ``path`` (one safetensors file); returns its size."""
        data = self.to_bytes()
        with atomic_write(path) as f:
            f.write(data)
        return len(data)

    @classmethod
    def load(cls, path) -> Task:
        """Read and validate a task file; never unpickles. Errors are :class:`ArtifactError`."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ArtifactError(f"cannot read task file {str(path)!r}: {exc}") from None
        return cls.from_bytes(data, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, path: str = "<bytes>") -> Task:
        meta = _read_header(data, path)
        manifest = _read_manifest(meta, path)
        try:
            tensors = st_load(data)
        except Exception as exc:  # safetensors reports damage with several exception types
            raise ArtifactError(f"task file {path!r} is corrupted: {exc}") from None
        tensors = _unpack_masks(tensors, manifest, path)
        full = _check_tensors(tensors, manifest, path)
        task = cls(tensors, manifest)
        task._full = (task._full_key(), full)  # validated once; reused by apply and build
        return task


def _pack_masks(tensors: dict[str, Tensor], manifest: dict) -> dict[str, Tensor]:
    """Tensors as written to the file: masks flagged ``packed`` as 8 channels per byte."""
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if manifest["tensors"][key].get("packed"):
            t = torch.from_numpy(np.packbits(t.numpy().astype(bool)))
        out[key] = t
    return out


def _unpack_masks(tensors: dict[str, Tensor], manifest: dict, path: str) -> dict[str, Tensor]:
    out = dict(tensors)
    for key, e in manifest["tensors"].items():
        t = tensors.get(key)
        if t is None or not e.get("packed"):
            continue
        n = math.prod(e["shape"])
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != (n + 7) // 8:
            raise ArtifactError(
                f"task {path!r}: packed mask {key!r} holds {list(t.shape)} {t.dtype}, expected "
                f"[{(n + 7) // 8}] uint8 bits for shape {e['shape']}"
            )
        bits = np.unpackbits(t.numpy(), count=n).astype(bool).reshape(e["shape"])
        out[key] = torch.from_numpy(bits)
    return out


def _read_header(data: bytes, path: str) -> dict:
    # A safetensors file has its JSON header at byte 8; a pickle starts with the 0x80 protocol
    # opcode, a torch.save file is a zip. Byte 0 alone is not enough: it is the low byte of
    # the header length, 0x80 for one length in 256.
    if data[8:9] != b"{" and (data[:1] == b"\x80" or data[:4] == b"PK\x03\x04"):
        raise ArtifactError(
            f"{path!r} is a pickle / torch.save file, not a sparta task; sparta never unpickles "
            "(it could run arbitrary code). Re-export the task with sparta.export(...).save()"
        )
    if len(data) < 8:
        raise ArtifactError(f"task file {path!r} is truncated ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ArtifactError(
            f"task file {path!r} is truncated or corrupted: header says {n} bytes, "
            f"file has {len(data) - 8} after the length"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        meta = header["__metadata__"]
        if not isinstance(meta, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ArtifactError(
            f"{path!r} is not a sparta task file (no readable safetensors header with a "
            "sparta manifest), or it is corrupted"
        ) from None
    return meta


def _read_manifest(meta: dict, path: str) -> dict:
    text = meta.get(MANIFEST_KEY)
    if not isinstance(text, str):
        raise ArtifactError(f"{path!r} holds no {MANIFEST_KEY!r}: not a sparta task file")
    if hashlib.sha256(text.encode()).hexdigest() != meta.get(CHECKSUM_KEY):
        raise ArtifactError(f"task file {path!r} is corrupted: manifest checksum differs")
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"task file {path!r} has an unreadable manifest: {exc}") from None
    _check_manifest(manifest, path)
    return manifest


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


def _check_manifest(m, path: str) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"{path!r} is not a sparta task (manifest format is not {FORMAT!r})")
    if not isinstance(m.get("version"), int) or m["version"] > VERSION:
        raise ArtifactError(
            f"task file {path!r} has format version {m.get('version')!r}, but this sparta "
            f"reads version {VERSION} and older; upgrade sparta to load it"
        )
    for key, typ in _SCHEMA.items():
        if not isinstance(m.get(key), typ):
            raise ArtifactError(
                f"task file {path!r}: manifest field {key!r} is missing or not a {typ.__name__}"
            )
    ok = (
        isinstance(m["adapter"].get("name"), str)
        and isinstance(m["adapter"].get("options"), dict)
        and all(isinstance(n, str) for n in m["adapted"] + m["head"])
        and all(
            isinstance(x, list) and len(x) == 2 and all(isinstance(s, str) for s in x)
            for x in m["masked"]
        )
        and isinstance(m["base"].get("sha256"), str)
        and isinstance(m["base"].get("tensors"), dict)
        and all(_entry_ok(e) for e in m["tensors"].values())
    )
    if not ok:
        raise ArtifactError(f"task file {path!r}: manifest does not follow the schema")
    if "inputs" in m and not check_spec(m["inputs"]):
        raise ArtifactError(f"task file {path!r}: manifest field 'inputs' is not an input spec")


def _entry_ok(e) -> bool:
    return (
        isinstance(e, dict)
        and e.get("kind") in KINDS
        and _ints(e.get("shape"))
        and isinstance(e.get("dtype"), str)
        and e["dtype"] in _DTYPES
        and isinstance(e.get("as", "bool"), str)
        and e.get("as", "bool") in _DTYPES
        and isinstance(e.get("sha256"), str)
        and _ints(e.get("stored", []))
        and isinstance(e.get("packed", False), bool)
        and (not e.get("packed") or e["kind"] == "mask")
        and all(isinstance(e.get(k), str | None) for k in ("rows", "cols"))
    )


def _ints(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value
    )


def _check_tensors(tensors: dict, manifest: dict, path) -> dict[str, Tensor]:
    """Validate ``tensors`` against the manifest; returns them at full size."""
    table = manifest["tensors"]
    if set(tensors) != set(table):
        extra, missing = sorted(set(tensors) - set(table)), sorted(set(table) - set(tensors))
        raise ArtifactError(
            f"task {str(path)!r}: tensors do not match the manifest "
            f"(not listed: {extra[:3]}, absent: {missing[:3]})"
        )
    for key, t in tensors.items():
        e = table[key]
        shape = e.get("stored", e["shape"])
        if list(t.shape) != shape or t.dtype != _DTYPES[e["dtype"]]:
            raise ArtifactError(
                f"task {str(path)!r}: tensor {key!r} is {list(t.shape)} {t.dtype}, the manifest "
                f"says {shape} {e['dtype']}"
            )
        if _digest(t) != e["sha256"]:
            raise ArtifactError(f"task {str(path)!r} is corrupted: tensor {key!r} checksum differs")
    return _full_tensors(tensors, table, path)


# -- compact storage of pruned channels ----------------------------------------------------------
def _layout(model: nn.Module) -> dict[str, tuple[str | None, str | None]]:
    """``{trainable key: (rows mask key, columns mask key)}``: which masks select the rows and
    columns of a tensor that reach the output (a masked entry is multiplied by zero)."""
    from ..adapters.splora import SPLoRA
    from ..adapters.sppara import SPPaRA
    from ..pruning.masks import SharedMask

    names = {id(m): n for n, m in model.named_modules()}

    def key(module: nn.Module, attr: str) -> str:
        return f"{names[id(module)]}.{attr}".lstrip(".")

    out: dict[str, tuple[str | None, str | None]] = {}
    for m in model.modules():
        if isinstance(m, SPLoRA) and m.groups == 1:  # delta = diag(m_out) B A diag(m_in)
            out[key(m, "B")] = (key(m, "mask_out"), None)
            out[key(m, "A")] = (None, key(m, "mask_in"))
        elif isinstance(m, SPPaRA) and m.groups == 1:
            out[key(m, "P")] = (key(m, "mask_out"), key(m, "mask_in"))
        elif isinstance(m, AdaptedLayer) and m.base.bias is not None:
            out[key(m.base, "bias")] = (key(m.adapter, "mask_out"), None)
        elif parametrize.is_parametrized(m):
            for plist in m.parametrizations.values():
                fn = plist[0] if len(plist) == 1 else None
                owner = fn._owner[0] if isinstance(fn, SharedMask) else fn
                if not isinstance(owner, ChannelMask):
                    continue
                full = fn is owner and owner.mask_in is not None and owner.groups == 1
                cols = key(owner, "mask_in") if full and plist.original.dim() >= 2 else None
                out[key(plist, "original")] = (key(owner, "mask_out"), cols)
                if isinstance(m, nn.modules.batchnorm._NormBase) and fn is owner:
                    # A pruned channel's output is 0 * (x - mean) / std + 0: its statistics
                    # never matter, so only kept channels' statistics are stored.
                    for stat in ("running_mean", "running_var"):
                        if m._buffers.get(stat) is not None:
                            out[key(m, stat)] = (key(owner, "mask_out"), None)
    return out


def _compact(t: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    if rows is not None:
        t = t[rows]
    return t if cols is None else t[:, cols]


def _expand(t: Tensor, shape: list[int], rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """Inverse of :func:`_compact`, pruned entries as zeros (``rows``/``cols``: the kept
    indices, from :func:`_kept_indices`)."""
    if cols is not None:
        t = torch.zeros(t.shape[0], *shape[1:], dtype=t.dtype).index_copy_(1, cols, t)
    if rows is not None:
        t = torch.zeros(shape, dtype=t.dtype).index_copy_(0, rows, t)
    return t


def _full_tensors(tensors: dict, table: dict, path) -> dict[str, Tensor]:
    """The task's tensors at full size; checks every compact entry against its masks."""
    out, kept = {}, {}  # kept: mask name -> indices of its kept entries
    for key, t in tensors.items():
        e = table[key]
        if "stored" not in e:
            out[key] = t
            continue
        masks, expected = [], list(e["shape"])
        for axis, side in enumerate(("rows", "cols")):
            name = e.get(side)
            mask = None
            if name is not None:
                mask = tensors.get(name)
                if (
                    table.get(name, {}).get("kind") != "mask"
                    or mask is None
                    or mask.dtype != torch.bool
                ):
                    raise ArtifactError(f"task {str(path)!r}: {key!r} refers to no mask {name!r}")
                if len(expected) <= axis or list(mask.shape) != [expected[axis]]:
                    raise ArtifactError(
                        f"task {str(path)!r}: mask {name!r} does not fit {key!r} {e['shape']}"
                    )
                if name not in kept:
                    kept[name] = mask.nonzero().flatten()
                mask = kept[name]
                expected[axis] = len(mask)
            masks.append(mask)
        if list(t.shape) != expected:
            raise ArtifactError(
                f"task {str(path)!r}: {key!r} stores {list(t.shape)} entries, its masks keep "
                f"{expected}"
            )
        out[key] = _expand(t, e["shape"], *masks)
    return out


# -- export and apply ----------------------------------------------------------------------------
def _masked_sites(model: nn.Module) -> list[list[str]]:
    """``[module, tensor]`` of every plain tensor carrying a :class:`ChannelMask`."""
    sites = []
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for attr, plist in m.parametrizations.items():
                if any(isinstance(fn, ChannelMask) for fn in plist):
                    sites.append([name, attr])
    return sites


def export(model: nn.Module, example_inputs=None) -> Task:
    """The :class:`Task` of a model returned by :func:`sparta.wrap` (trained, maybe pruned).

    ``example_inputs`` (a batch the model accepts) records the input shapes in the manifest so
    that :func:`sparta.build` needs no example; by default the shapes recorded by the
    :class:`~sparta.Pruner` that pruned ``model`` are used, if any.
    """
    report = getattr(model, "sparta_report", None)
    if report is None or not _is_wrapped(model):
        raise ConfigError("export expects a model returned by sparta.wrap (it has no adapters)")
    sd = model.state_dict()
    kinds, layout = _task_kinds(model), _layout(model)
    tensors, table = {}, {}
    for key, kind in sorted(kinds.items(), key=lambda kv: kv[1] != "mask"):  # masks first
        t = sd[key].detach().cpu()
        entry = {"kind": kind, "shape": list(t.shape)}
        if kind == "mask":
            if not bool(((t == 0) | (t == 1)).all()):
                raise ArtifactError(f"mask {key!r} holds values other than 0 and 1")
            entry.update({"as": str(t.dtype).removeprefix("torch."), "packed": True})
            t = t.bool()
        elif kind in ("param", "stat") and key in layout:
            # Entries of pruned channels never reach the output: store the kept ones only.
            rows, cols = (k if kinds.get(k) == "mask" else None for k in layout[key])
            if rows or cols:
                t = _compact(t, tensors.get(rows), tensors.get(cols))
                entry.update(stored=list(t.shape), rows=rows, cols=cols)
        tensors[key] = t.clone().contiguous()
        entry.update(dtype=str(t.dtype).removeprefix("torch."), sha256=_digest(t))
        table[key] = entry
    tensors = dict(sorted(tensors.items()))
    table = dict(sorted(table.items()))
    digests = base_digests(model)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "adapter": {"name": report.adapter, "options": dict(report.options)},
        "adapted": list(report.adapted),
        "head": list(report.head),
        "masked": _masked_sites(model),
        "tensors": table,
        "base": {"sha256": fingerprint(model), "tensors": digests},
        "counts": {
            "learned_parameters": learned_parameters(model),
            "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        },
    }
    spec = input_spec(example_inputs) if example_inputs is not None else _recorded_spec(model)
    if spec is not None:
        manifest["inputs"] = spec
    json.dumps(manifest)  # options must be JSON data; fail here, not at save time
    return Task(tensors, manifest)


def _recorded_spec(model: nn.Module):
    spec = getattr(model, "sparta_inputs", None)
    return spec if check_spec(spec) else None


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def check_base(base: nn.Module, task: Task) -> None:
    """Raise :class:`ArtifactError` unless ``base`` is the base ``task`` was trained on."""
    expected = task.manifest["base"]["tensors"]
    actual = base_digests(base, list(expected))
    bad = [n for n in expected if actual.get(n) != expected[n]]
    if bad or _combine(actual, base) != task.fingerprint:
        named = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ArtifactError(
            "base fingerprints differ: this task was trained on another base model"
            + (f" (tensors that differ: {named})" if bad else " (module structure differs)")
        )


def apply_task(base: nn.Module, task: Task) -> nn.Module:
    """The task model on ``base`` (a plain model, left unchanged): wrap, mask, load tensors."""
    if not isinstance(task, Task):
        raise TypeError(f"apply_task expects a sparta Task, got {type(task).__name__}")
    if _is_wrapped(base):
        raise ConfigError("apply_task expects the plain base model, not a wrapped one")
    check_base(base, task)
    return task_model(base, task, share_frozen=False)


def task_model(base: nn.Module, task: Task, share_frozen: bool) -> nn.Module:
    """:func:`apply_task` without the base check. ``share_frozen=True`` shares the storage of
    the adapted layers' frozen weights with ``base`` instead of copying it (for building a
    compact model, which replaces those weights by fused ones; never train such a model)."""
    from ..wrap import wrap

    m = task.manifest
    accepted = get_adapter(task.adapter).option_names()
    if set(task.options) - set(accepted):
        raise ArtifactError(
            f"task options {sorted(task.options)} are not options of adapter {task.adapter!r} "
            f"({', '.join(accepted) or 'none'})"
        )
    copied = _frozen_sharing_copy(base, m["adapted"]) if share_frozen else copy.deepcopy(base)
    model = wrap(
        copied,
        task.adapter,
        include=[_glob_escape(n) for n in m["adapted"]],
        head=m["head"],
        inplace=True,
        **task.options,
    )
    for name, attr in m["masked"]:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"task masks {name!r}, which the base does not have") from None
        if attr == "in_proj_weight" and isinstance(module, nn.MultiheadAttention):
            resolve_mask(model, name, "q")
        else:
            ensure_masks(module)
    _load(model, task)
    return model


def _frozen_sharing_copy(base: nn.Module, adapted: list[str]) -> nn.Module:
    """A deep copy of ``base`` whose adapted layers' weights alias the base's storage (new
    Parameter objects, so flags set on the copy stay on the copy); everything else is copied."""
    frozen = ("weight", "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    memo = {}
    for name in adapted:
        try:
            module = base.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"task adapts {name!r}, which the base does not have") from None
        for sub in (module, getattr(module, "out_proj", None)):
            for attr in frozen:
                p = getattr(sub, "_parameters", {}).get(attr)
                if p is not None:
                    memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return copy.deepcopy(base, memo)


def _load(model: nn.Module, task: Task, cache: dict | None = None) -> None:
    """Load ``task``'s tensors into the wrapped ``model``. ``cache`` (a dict kept by the caller
    for this model) saves the walks over the model when loading task after task into it."""
    cache = {} if cache is None else cache
    if "sd" not in cache:
        cache["sd"], cache["kinds"] = model.state_dict(), _task_kinds(model)
    sd, kinds = cache["sd"], cache["kinds"]
    table = task.manifest["tensors"]
    owned = {k for k, kind in kinds.items() if kind != "param"}
    unknown = sorted(set(table) - set(sd))
    missing = sorted(owned - set(table))
    if unknown or missing:
        raise ArtifactError(
            f"task does not fit the rebuilt model: unknown tensors {unknown[:3]}, "
            f"missing masks/statistics {missing[:3]}"
        )
    full = task.full_tensors()
    for key, t in full.items():
        if sd[key].shape != t.shape:
            raise ArtifactError(
                f"task tensor {key!r} has shape {list(t.shape)}, the model expects "
                f"{list(sd[key].shape)}"
            )
    with torch.no_grad():
        for key, t in full.items():
            sd[key].copy_(t.to(sd[key].dtype))
    trainable = {k for k, e in table.items() if e["kind"] == "param"}
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(name in trainable)
