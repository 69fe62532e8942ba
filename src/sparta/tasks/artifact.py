"""The per-task artifact: what a task learned, in one safetensors file with a JSON manifest.

A task is the part of a wrapped (and possibly pruned) model that the shared base does not hold:
every trainable tensor (adapters, biases, norm affine parameters, the head), every channel mask
(stored as packed bits) and the BatchNorm running statistics. Entries of pruned channels are not
stored at all. Keys are the wrapped model's
``state_dict`` keys. The manifest records the adapter configuration, which layers were adapted
and masked, a SHA-256 fingerprint of the frozen base tensors, a checksum of every stored tensor
and the counts, and (optionally) the shapes of an example input, so that the compact model can be
built without the caller passing one. Loading never unpickles (design.md, style rule 5).

This module holds the :class:`Task`, :func:`export` and :func:`apply_task`; reading and checking
files is in :mod:`.taskfile`, base fingerprints in :mod:`.fingerprint`, rebuilding a task model
on a base in :mod:`.apply`, the compact plan in :mod:`.plan` (recorded by :mod:`.make_plan`,
built by :mod:`.from_plan`). Their public names are importable from here too.

Format history: version 1 stored masks as one byte per channel and BatchNorm statistics in full;
version 2 packs masks into bits and stores statistics of kept channels only; version 3 adds the
compact plan (:mod:`.plan`), so a build slices the base without tracing. All are read; a task
that cannot carry a plan (no recorded inputs, or a model only the traced graph can cut) is
written as version 2. File format 4 changes the container only: the manifest (schema version
1-3 as above) is stored deflated (:func:`.taskfile.manifest_meta`) and the safetensors header
lists one tensor per dtype (:func:`.taskfile.serialize`); files of formats 1-3 are still read.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..adapters.layer import AdaptedLayer
from ..errors import ConfigError
from ..inputs import input_spec, spec_problem
from ..io import atomic_write
from ..masks import ChannelMask
from ..measure import learned_parameters
from .apply import _frozen_sharing_copy, _glob_escape, _load, task_model
from .fingerprint import (
    _base_names,
    _combine,
    _frozen,
    _is_wrapped,
    _masked_sites,
    _structure,
    _task_kinds,
    base_digests,
    check_base,
    fingerprint,
)
from .make_plan import plan_of
from .taskfile import (
    _DTYPES,
    CHECKSUM_KEY,
    FORMAT,
    KINDS,
    MANIFEST_KEY,
    MAX_FILE_BYTES,
    STATS,
    VERSION,
    ArtifactError,
    check_manifest,
    check_tensors,
    digest,
    full_tensors,
    manifest_meta,
    pack_masks,
    parse_task,
    read_task,
    serialize,
)
from .taskfile import compact as _compact
from .taskfile import pack_masks as _pack_masks

__all__ = [  # the names other modules and tests import from here
    "CHECKSUM_KEY", "FORMAT", "KINDS", "MANIFEST_KEY", "STATS", "VERSION", "ArtifactError",
    "Task", "apply_task", "base_digests", "check_base", "export", "fingerprint", "task_model",
    "_DTYPES", "_base_names", "_combine", "_frozen", "_frozen_sharing_copy", "_glob_escape",
    "_is_wrapped", "_load", "_pack_masks", "_structure", "_task_kinds",
]  # fmt: skip


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

    @property
    def plan(self) -> dict | None:
        """The compact plan (format version 3; see :mod:`sparta.tasks.plan`), or ``None``."""
        return self.manifest.get("plan")

    def without_plan(self) -> Task:
        """The same task as a version 2 task (no plan): it builds from the traced graph, as
        files written before plans did (for comparisons with the older format)."""
        manifest = {k: v for k, v in self.manifest.items() if k != "plan"}
        manifest["version"] = min(manifest["version"], 2)
        return Task(dict(self.tensors), manifest)

    def full_tensors(self) -> dict[str, Tensor]:
        """Tensors at the model's shapes (entries of pruned channels, not stored, as zeros);
        cached until a tensor is replaced or edited in place."""
        key = self._full_key()
        if self._full is None or self._full[0] != key:
            self._full = (key, full_tensors(self.tensors, self.manifest["tensors"], "<task>"))
        return self._full[1]

    def _full_key(self) -> list:
        return [(k, id(t), t._version) for k, t in self.tensors.items()]

    def to_bytes(self) -> bytes:
        """The file contents :meth:`save` writes: the same bytes for the same task, in any
        process (sorted JSON keys, deterministic safetensors layout)."""
        check_tensors(self.tensors, self.manifest, "<task>")
        meta = manifest_meta(self.manifest)  # file format 4: the manifest compressed
        return serialize(pack_masks(self.tensors, self.manifest), meta)

    def save(self, path) -> int:
        """Write the task atomically to ``path`` (one safetensors file); returns its size.
        A path that cannot be written raises :class:`~sparta.errors.FileError` naming it."""
        data = self.to_bytes()
        with atomic_write(path) as f:
            f.write(data)
        return len(data)

    @classmethod
    def load(cls, path, max_bytes: int = MAX_FILE_BYTES) -> Task:
        """Read and validate a task file; never unpickles. Errors are :class:`ArtifactError`.

        Only a regular file of at most ``max_bytes`` is read, and its header and manifest are
        checked before the tensors are."""
        return cls(*read_task(path, max_bytes))

    @classmethod
    def from_bytes(cls, data: bytes, path: str = "<bytes>") -> Task:
        """The task in ``data`` (a task file's bytes), validated as :meth:`load` does."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ArtifactError(f"expected the bytes of a task file, got {type(data).__name__}")
        return cls(*parse_task(bytes(data), path))


# -- compact storage of pruned channels ----------------------------------------------------------
def _layout(model: nn.Module) -> dict[str, tuple[str | None, str | None]]:
    """``{trainable key: (rows mask key, columns mask key)}``: which masks select the rows and
    columns of a tensor that reach the output (a masked entry is multiplied by zero)."""
    from ..adapters.splora import SPLoRA
    from ..adapters.sppara import SPPaRA
    from ..masks import SharedMask

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


def apply_task(base: nn.Module, task: Task) -> nn.Module:
    """The task model on ``base`` (a plain model, left unchanged): wrap, mask, load tensors."""
    if not isinstance(task, Task):
        raise TypeError(f"apply_task expects a sparta Task, got {type(task).__name__}")
    if _is_wrapped(base):
        raise ConfigError("apply_task expects the plain base model, not a wrapped one")
    check_manifest(task.manifest, "<task>")
    check_base(base, task)
    return task_model(base, task, share_frozen=False)


def export(model: nn.Module, example_inputs=None) -> Task:
    """The :class:`Task` of a model returned by :func:`sparta.wrap` (trained, maybe pruned).

    ``example_inputs`` (a batch the model accepts) records the input shapes in the manifest so
    that :func:`sparta.build` needs no example; by default the shapes recorded by the
    :class:`~sparta.Pruner` that pruned ``model`` are used, if any.
    """
    report = getattr(model, "sparta_report", None)
    if report is None or not _is_wrapped(model):
        raise ConfigError("export expects a model returned by sparta.wrap (it has no adapters)")
    adapter = {"name": report.adapter, "options": dict(report.options)}
    task = export_layout(model, adapter, list(report.adapted), list(report.head), example_inputs)
    return with_plan(task, plan_of(model, task))  # called here: its warning names the caller


def export_layout(
    model: nn.Module, adapter: dict, adapted: list, head: list, example_inputs=None
) -> Task:
    """:func:`export` with the layout given, without the plan (a version 2 task; see
    :func:`with_plan`): ``adapter`` (``{"name", "options"}``), the ``adapted`` layers and the
    ``head``. On a plain model (a baseline, see
    :mod:`sparta.tasks.baseline`) every trainable tensor is the task's and the base's
    fingerprint covers its frozen tensors (none, when everything was trained) and structure."""
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
        entry.update(dtype=str(t.dtype).removeprefix("torch."), sha256=digest(t))
        table[key] = entry
    tensors = dict(sorted(tensors.items()))
    table = dict(sorted(table.items()))
    names = None if _is_wrapped(model) else [k for k in sd if k not in kinds]
    digests = base_digests(model, names)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "adapter": adapter,
        "adapted": list(adapted),
        "head": list(head),
        "masked": _masked_sites(model),
        "tensors": table,
        "base": {"sha256": fingerprint(model, names), "tensors": digests},
        "counts": {
            "learned_parameters": learned_parameters(model),
            "learned_parameters_paper": learned_parameters(model, accounting="paper"),
            "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        },
    }
    spec = _spec_to_record(example_inputs, model)
    if spec is not None:
        manifest["inputs"] = spec
    json.dumps(manifest)  # options must be JSON data; fail here, not at save time
    return Task(tensors, {**manifest, "version": 2})


def with_plan(task: Task, plan: dict | None) -> Task:
    """``task`` (from :func:`export_layout`) with ``plan`` (``plan_of(model, task)``, verified
    against the masked model there, once) as a version 3 task; without one, as it is."""
    if plan is None:
        return task
    return Task(task.tensors, {**task.manifest, "version": VERSION, "plan": plan})


def _spec_to_record(example_inputs, model: nn.Module) -> dict | None:
    """The input spec to record: of ``example_inputs``, else the Pruner's. A batch too big to
    record (see :func:`sparta.inputs.spec_problem`) is recorded with a batch of 2 if that
    fits; otherwise nothing is recorded, with a warning (build then needs example_inputs)."""
    if example_inputs is not None:
        spec = input_spec(example_inputs)
    else:
        spec = getattr(model, "sparta_inputs", None)
        if spec is None:
            return None
    if spec_problem(spec) is None:
        return spec
    smaller = _with_batch(spec, 2)
    if spec_problem(smaller) is None:
        return smaller
    warnings.warn(
        f"export: the example inputs cannot be recorded ({spec_problem(spec)}); "
        "sparta.build will need example_inputs=<a batch>",
        stacklevel=3,
    )
    return None


def _with_batch(spec, batch: int):
    """``spec`` with the first dimension of every tensor capped at ``batch``."""
    if not isinstance(spec, dict) or len(spec) != 1:
        return spec
    ((kind, value),) = spec.items()
    if kind == "tensor" and isinstance(value, dict) and isinstance(value.get("shape"), list):
        shape = value["shape"]
        if shape and isinstance(shape[0], int):
            shape = [min(shape[0], batch), *shape[1:]]
        return {"tensor": {**value, "shape": shape}}
    if kind == "tuple" and isinstance(value, list):
        return {"tuple": [_with_batch(x, batch) for x in value]}
    if kind == "dict" and isinstance(value, dict):
        return {"dict": {k: _with_batch(x, batch) for k, x in value.items()}}
    return spec
