"""Fingerprints of a base model: which frozen tensors a task was trained on, seen through
adapters and parametrisations, so that a task is only ever applied to its own base."""

from __future__ import annotations

import hashlib
import json
from typing import Protocol

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..adapters.attention import AdaptedWeight
from ..adapters.base import Adapter
from ..adapters.layer import AdaptedLayer
from ..errors import ConfigError
from ..masks import ChannelMask
from .taskfile import STATS, ArtifactError, digest


class _Task(Protocol):
    """What :func:`check_base` reads of a :class:`~sparta.tasks.artifact.Task` (named, not
    imported: the artifact module imports this one)."""

    manifest: dict

    @property
    def fingerprint(self) -> str: ...


# -- classifying a wrapped model's tensors -------------------------------------------------------
def _is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(m, AdaptedLayer | AdaptedWeight) for m in model.modules())


def _task_kinds(model: nn.Module) -> dict[str, str]:
    """``{state_dict key: kind}`` for every tensor the task owns (see the module docstring)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    kinds: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
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
    adapted = [
        n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, AdaptedLayer)
    ]
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
        n: f"{list(t.shape)}|{str(t.dtype).removeprefix('torch.')}|{digest(t)}"
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
    if hasattr(names, "manifest"):  # a Task
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


def check_base(base: nn.Module, task: _Task) -> None:
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


def _masked_sites(model: nn.Module) -> list[list[str]]:
    """``[module, tensor]`` of every plain tensor carrying a :class:`ChannelMask`."""
    sites = []
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for attr, plist in m.parametrizations.items():
                if any(isinstance(fn, ChannelMask) for fn in plist):
                    sites.append([name, attr])
    return sites
