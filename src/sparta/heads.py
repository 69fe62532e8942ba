"""The head: the layer whose outputs are the model's outputs, found one way everywhere.

``sparta.wrap`` keeps the head plain and trainable; the ``Pruner`` never prunes its outputs
(class logits must all stay alive), for adapted and fine-pruned models alike. Two definitions,
by what is known:

* without example inputs (``wrap``): :func:`static_head`, the last registered ``nn.Linear`` or
  non-transposed convolution. Registration order is the only structural hint a module tree
  gives; it is right for torchvision, timm and Hugging Face classifiers, whose head is declared
  last, whether a Linear or a 1x1 conv (SqueezeNet). ``head=`` overrides it.
* with example inputs (``Pruner``): :func:`output_layers`, traced: the layers from whose outputs
  the model's outputs are computed without passing through another layer. This is exact for
  the model as it runs (it also finds a second head, as in distilled DeiT, and a residual
  stream that is itself the output, whose channels must not be pruned either).

:func:`protected_layers` is what the Pruner never prunes: the head ``wrap`` chose (or the
static one for a plain model) together with the traced output layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .errors import ConfigError
from .utils import call


def _is_layer(module: nn.Module) -> bool:
    from .adapters.layer import AdaptedLayer

    if isinstance(module, AdaptedLayer | nn.Linear | nn.MultiheadAttention):
        return True
    return isinstance(module, _ConvNd) and not module.transposed


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear, conv (not transposed), adapted and attention layers by name, in registration
    order; never a module inside another one (an adapted layer's ``base``, an attention's
    ``out_proj``)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name and _is_layer(module) and not _inside(name, found):
            found[name] = module
    return found


def static_head(model: nn.Module) -> list[str]:
    """``[name]`` of the last registered Linear or conv layer (adapted or plain), or ``[]``."""
    names = [n for n, m in layers(model).items() if not isinstance(m, nn.MultiheadAttention)]
    return names[-1:]


def head_of(model: nn.Module) -> list[str]:
    """The head ``sparta.wrap`` recorded on ``model``, else (a plain model) :func:`static_head`."""
    report = getattr(model, "sparta_report", None)
    return list(report.head) if report is not None else static_head(model)


def output_layers(model: nn.Module, example_inputs) -> list[str]:
    """Names of the layers whose outputs reach the model's outputs through no other layer.

    Runs the model once (eval mode, parameters untouched) with each layer's output replaced by
    a fresh leaf tensor that requires grad, then walks the autograd graph back from every
    output tensor: the leaves it reaches belong to the output layers.
    """
    found = layers(model)
    leaves: dict[int, str] = {}
    kept: list[Tensor] = []  # holds the leaves, so that their ids stay unique

    def cut(name: str, t: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            return t
        leaf = t.detach().requires_grad_()
        kept.append(leaf)
        leaves[id(leaf)] = name
        return leaf.clone()  # in-place edits downstream must not touch the leaf itself

    hooks = [
        m.register_forward_hook(lambda _m, _a, out, n=n: _map(out, lambda t: cut(n, t)))
        for n, m in found.items()
    ]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        # Only the graph's shape is needed, never a backward: saved activations are dropped,
        # so the trace costs the memory of an inference pass.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _drop):
            outputs = call(model, example_inputs)
    except Exception as exc:
        raise ConfigError(
            "could not run the model to find the layers producing its outputs "
            f"({type(exc).__name__}: {exc}); pass ignored=[...] to name them"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    reached = _reached(_tensors(outputs), leaves)
    return [n for n in found if n in reached]


def _drop(_):
    return None


def _reached(outputs: list[Tensor], leaves: dict[int, str]) -> set[str]:
    names: set[str] = set()
    seen: set = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    names.update(leaves[id(t)] for t in outputs if id(t) in leaves)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None and id(variable) in leaves:
            names.add(leaves[id(variable)])
            continue
        stack.extend(nxt for nxt, _ in node.next_functions)
    return names


def _map(value, fn):
    """``value`` with ``fn`` applied to every tensor in it (tuples, lists, dicts)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_map(v, fn) for v in value)
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    return value


def _tensors(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    return []


def protected_layers(model: nn.Module, example_inputs=None) -> set[str]:
    """Layers whose outputs pruning must keep: the head ``sparta.wrap`` recorded (or, for a
    plain model, :func:`static_head`) and, given example inputs, every traced output layer.

    Warns when the recorded head is not among the traced output layers: ``wrap`` then
    treated some other layer as the head (pass ``head=`` to it).
    """
    report = getattr(model, "sparta_report", None)
    head = head_of(model)
    if example_inputs is None:
        return set(head)
    traced = output_layers(model, example_inputs)
    if report is not None and head and traced and not any(_inside(t, head) for t in traced):
        warnings.warn(
            f"sparta.wrap kept {', '.join(head)} as the head, but the model's outputs come from "
            f"{', '.join(traced)}; their outputs are not pruned either. Pass head=[...] to "
            "sparta.wrap to choose the head yourself",
            UserWarning,
            stacklevel=3,
        )
    return set(head) | set(traced)
