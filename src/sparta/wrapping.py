"""``sparta.wrap``: turn a model into a frozen base plus adapters; ``sparta.fuse``: back to plain."""

from __future__ import annotations

import copy
import difflib
import fnmatch
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from .adapters.attention import AdaptedWeight, adapt_attention
from .adapters.base import get_adapter
from .adapters.layer import AdaptedLayer, adapt_reason, layer_geometry
from .errors import ConfigError, SkippedLayerWarning
from .heads import static_head
from .registry import require_modules
from .utils import NORMS


@dataclass
class SkippedLayer:
    name: str
    type: str
    reason: str


@dataclass
class WrapReport:
    """What :func:`wrap` did: adapted layers, skipped layers with reasons, and the head."""

    adapter: str
    options: dict
    adapted: list[str] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"adapter {self.adapter} {self.options}: {len(self.adapted)} layers adapted, "
            f"{len(self.skipped)} skipped, {len(self.excluded)} excluded by pattern",
            f"head (plain, trainable): {', '.join(self.head) or '(none)'}",
        ]
        lines += [f"skipped {s.name} ({s.type}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _is_candidate(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention | nn.Linear):
        return True
    return isinstance(module, _ConvNd) and not module.transposed


def _kind(module: nn.Module) -> str:
    return "attention" if isinstance(module, nn.MultiheadAttention) else layer_geometry(module)[0]


def _check_patterns(patterns, names: list[str], what: str) -> list[str]:
    if patterns is None:
        return []
    patterns = _names_list(patterns, what)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{what} patterns must be strings, got {p!r}")
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            hint = difflib.get_close_matches(p, names, n=3)
            raise ConfigError(
                f"{what} pattern {p!r} matches no module"
                + (f"; close names: {', '.join(hint)}" if hint else "")
            )
    return patterns


def _names_list(value, what: str) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    raise TypeError(f"{what} must be a name or a list of names, got {type(value).__name__}")


def _resolve_head(model: nn.Module, head) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    if head is None:
        return []
    if head == "auto":
        # The last registered Linear or conv (see sparta.heads; the Pruner checks it against
        # the layers that really produce the outputs); pass head=... to choose otherwise.
        return static_head(model)
    heads = _names_list(head, "head")
    require_modules(heads, names, "head")
    return heads


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _replace(model: nn.Module, paths: list[str], new: nn.Module) -> None:
    for path in paths:
        parent, _, child = path.rpartition(".")
        model.get_submodule(parent)._modules[child] = new


def wrap(
    model: nn.Module,
    adapter: str = "splora",
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    head: str | Iterable[str] | None = "auto",
    train_norms: bool = True,
    train_biases: bool = True,
    inplace: bool = False,
    **options,
) -> nn.Module:
    """Adapt ``model``: freeze its weights and add ``adapter`` to every target layer.

    Targets are ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.MultiheadAttention`` modules the
    adapter supports, narrowed by ``include``/``exclude`` glob patterns on module names. The head
    (by default the last registered ``nn.Linear`` or conv, see :mod:`sparta.heads`; any module
    names with ``head=``) stays plain and trainable, as do norm affine parameters and the biases
    of adapted layers. Torch-layer subclasses are adapted only where sparta reproduces their
    forward exactly (:mod:`sparta.adapters.forms`), else skipped with the reason. ``options`` go to the adapter (SPLoRA: ``rank``,
    ``init_scale``). Layers that cannot be adapted are skipped with a warning and listed, with the
    reason, in ``returned_model.sparta_report`` (a :class:`WrapReport`).

    Returns an adapted deep copy, or ``model`` itself when ``inplace=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap expects a torch.nn.Module, got {type(model).__name__}")
    for flag, value in (
        ("train_norms", train_norms),
        ("train_biases", train_biases),
        ("inplace", inplace),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    cls = get_adapter(adapter)
    options = cls.resolve_options(options)
    if any(isinstance(m, AdaptedLayer | AdaptedWeight) for m in model.modules()):
        raise ConfigError("model is already wrapped; call sparta.fuse(model) first to re-wrap")
    all_names = [n for n, _ in model.named_modules() if n]
    include = _check_patterns(include, all_names, "include")
    exclude = _check_patterns(exclude, all_names, "exclude")

    # Plan on the caller's model first, so that a refusal leaves it exactly as it was.
    candidates = _candidates(model)
    report = WrapReport(adapter=cls.name, options=dict(options))
    report.head = _resolve_head(model, head)
    targets = []
    for name, module in candidates.items():
        if _inside(name, report.head):
            continue
        if (include and not any(fnmatch.fnmatchcase(name, p) for p in include)) or any(
            fnmatch.fnmatchcase(name, p) for p in exclude
        ):
            report.excluded.append(name)
        elif reason := _unsupported(module, cls, options):
            report.skipped.append(SkippedLayer(name, type(module).__name__, reason))
        else:
            targets.append(name)
    if not targets:
        why = "; ".join(f"{s.name}: {s.reason}" for s in report.skipped[:5])
        raise ConfigError(
            f"wrap adapted no layer with adapter {cls.name!r} ({why or _no_target_hint(model)})"
        )

    model = model if inplace else copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    # Per-call state the adapters share (SPLoPA's prototype bank): one per wrapped model.
    context = cls.new_context()
    extra = {} if context is None else {"context": context}
    for name in targets:
        _adapt(model, name, paths, cls, {**options, **extra}, train_biases)
        report.adapted.append(name)
    for name in report.head:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    if train_norms:
        for m in model.modules():
            if isinstance(m, NORMS):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
    if report.skipped:
        listed = "; ".join(f"{s.name} ({s.reason})" for s in report.skipped)
        warnings.warn(
            f"sparta.wrap left {len(report.skipped)} layer(s) frozen and unadapted: {listed}",
            SkippedLayerWarning,
            stacklevel=2,
        )
    model.sparta_report = report
    return model


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if n and _is_candidate(m) and not _inside(n, _attention_names(model, n))
    }


def _no_target_hint(model: nn.Module) -> str:
    """What the model holds instead of target layers: types owning a weight matrix."""
    types = {
        type(m).__qualname__
        for m in model.modules()
        if any(p.dim() >= 2 for p in m.parameters(recurse=False))
        and not isinstance(m, nn.Embedding | nn.EmbeddingBag)
    }
    held = f"; its layers with weight matrices are {', '.join(sorted(types)[:6])}" if types else ""
    return (
        "no target layers: sparta adapts nn.Linear, nn.Conv1d/2d/3d and nn.MultiheadAttention "
        "(and their subclasses it reproduces), outside the head" + held
    )


def _adapt(model: nn.Module, name: str, paths, cls, options: dict, train_biases: bool) -> None:
    module = model.get_submodule(name)
    if isinstance(module, nn.MultiheadAttention):
        # Set the bias flags before parametrising: afterwards the attribute names return
        # computed tensors and the real parameters live under .parametrizations.
        for p in (module.in_proj_bias, module.out_proj.bias):
            if p is not None:
                p.requires_grad_(train_biases)
        adapt_attention(module, lambda o, i: cls(o, i, 1, **options))
    else:
        if module.bias is not None:
            module.bias.requires_grad_(train_biases)
        _replace(
            model,
            paths[id(module)],
            AdaptedLayer(module, cls(*layer_geometry(module)[1:], **options)),
        )


def _attention_names(model: nn.Module, name: str) -> list[str]:
    """Names of the MultiheadAttention modules strictly above ``name`` (their projections are
    adapted through the attention module, never as separate Linear layers)."""
    parts = name.split(".")
    above = [".".join(parts[:i]) for i in range(1, len(parts))]
    return [a for a in above if isinstance(model.get_submodule(a), nn.MultiheadAttention)]


def _unsupported(module: nn.Module, cls, options: dict) -> str | None:
    kind = _kind(module)
    if kind not in cls.kinds:
        return f"adapter {cls.name!r} adapts {', '.join(cls.kinds)} layers, not {kind}"
    if kind == "attention":
        e = module.embed_dim
        shapes = [(e, e), (e, module.kdim), (e, module.vdim)]
        return next((r for o, i in shapes if (r := cls.unsupported_reason(o, i, 1, options))), None)
    reason = adapt_reason(module)
    return reason or cls.unsupported_reason(*layer_geometry(module)[1:], options)


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Plain torch modules computing the same function: adapters and masks baked into weights.

    Every :class:`AdaptedLayer` becomes its base layer type holding ``(W + delta) * M`` and the
    masked bias; every parametrised attention weight becomes a plain tensor.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects a torch.nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    for m in list(model.modules()):
        if isinstance(m, AdaptedLayer):
            plain = _fused_copy(m)
            if paths[id(m)] == [""]:
                return plain
            _replace(model, paths[id(m)], plain)
        elif parametrize.is_parametrized(m):
            bake_parametrizations(m)
    model.__dict__.pop("sparta_report", None)
    return model


def bake_parametrizations(module: nn.Module) -> None:
    """Replace every parametrised tensor of ``module`` by its current value, in place.

    A deep copy of a parametrised module shares the class torch generated for the original,
    and removing a parametrisation deletes the property from that class; so the module gets a
    class of its own first, which keeps the original (and other copies) working.
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    with torch.no_grad():
        for attr in list(module.parametrizations):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def _fused_copy(layer: AdaptedLayer) -> nn.Module:
    return layer.fused_layer()
