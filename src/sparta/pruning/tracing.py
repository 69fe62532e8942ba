"""Channel groups from torch-pruning's dependency graph, bounded in time and memory, and only
where the coupling is proven.

torch-pruning traces the model's autograd graph and knows how a removed channel propagates
through layers, norms, additions, concatenation, channel splits and flattening. Two of its
habits are unsafe for an exact compact model, so the walk over the graph is done here:

* every operation it does not know (a matmul, a transpose...) is treated as elementwise, and a
  reshape, unbind or expand is mapped by guesswork: fused q/k/v projections, channel shuffles
  and window partitions come out as wrong groups. A group whose channels pass through such an
  operation is not pruned; the notes say which group and why (see :func:`_unproven`).
* a guessed reshape mapping multiplies the index lists at each step (MaxViT's window
  partitions grew them to tens of GB); every list is bounded by the widest layer, and the whole
  walk by :data:`TIME_LIMIT` seconds and :data:`NODE_LIMIT` graph nodes.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..errors import ConfigError

#: Seconds the grouping may take before it is refused (the trace itself is one forward).
TIME_LIMIT = 120.0
#: Nodes of the autograd graph above which the model is refused.
NODE_LIMIT = 200_000
#: Autograd operations that mix channels although torch-pruning takes them as elementwise.
_MIXING = ("bmm", "attention", "einsum", "conv_tbc")


class _Unproven(Exception):
    """A group's coupling cannot be proven exact (the message says why)."""


def build_graph(proxy: nn.Module, example_inputs):
    """torch-pruning's graph of ``proxy`` (plain, every parameter requiring grad); its index
    mappings are set node by node, and nodes whose mapping fails are marked unmappable."""
    import torch_pruning as tp
    from torch_pruning.dependency import index_mapping

    graph = tp.DependencyGraph()
    graph.sparta_unmappable = set()
    with warnings.catch_warnings(), _guarded_mappings(graph, index_mapping):
        warnings.simplefilter("ignore")  # torch-pruning warns about modules it does not know
        with torch.enable_grad():
            graph.build_dependency(
                proxy, example_inputs=example_inputs, verbose=False, output_transform=_traced
            )
    if len(graph.module2node) > NODE_LIMIT:
        raise ConfigError(
            f"the model's autograd graph has {len(graph.module2node):,} nodes, more than the "
            f"{NODE_LIMIT:,} sparta groups in bounded time; prune a smaller model or pass "
            "smaller example_inputs"
        )
    return graph


def _traced(out) -> list:
    """The output tensors with a graph to trace, from nested tuples, lists and dicts (a
    Hugging Face output is a dict); anything else is left out: torch-pruning iterated a
    decoder's key/value cache into tuples and failed ("'tuple' object has no attribute
    'grad_fn'")."""
    if isinstance(out, torch.Tensor):
        return [out] if out.grad_fn is not None else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for item in out for t in _traced(item)]
    return []


@contextmanager
def _guarded_mappings(graph, index_mapping):
    """While building, set each node's mapping alone: one that raises (e.g. a channel shuffle's
    reshape, ``ZeroDivisionError``) marks that node instead of failing the whole graph."""
    original = index_mapping.update_index_mapping
    updates = {
        "CONCAT": index_mapping.update_concat_index_mapping,
        "SPLIT": index_mapping.update_split_index_mapping,
        "RESHAPE": index_mapping.update_reshape_index_mapping,
        "UNBIND": index_mapping.update_unbind_index_mapping,
        "EXPAND": index_mapping.update_expand_index_mapping,
        "SLICE": index_mapping.update_slice_index_mapping,
    }

    def update(g):
        for node in list(g.module2node.values()):
            fn = updates.get(node.type.name)
            if fn is None or node in g.sparta_unmappable:
                continue
            try:
                fn(g, node)
            except Exception:  # any failure: this node's channel mapping is unknown
                g.sparta_unmappable.add(node)

    index_mapping.update_index_mapping = update
    try:
        yield
    finally:
        index_mapping.update_index_mapping = original


def all_closures(graph, ignored: list[nn.Module], notes: list[str], names: dict):
    """``(root module, items)`` for every Conv/Linear root not reached before, where ``items``
    maps ``(target node, handler)`` to ``{(index, root index)}``; unproven groups are skipped
    with a note. Mirrors torch-pruning's ``get_all_groups`` with bounds and checks."""
    import torch_pruning as tp

    deadline = time.monotonic() + TIME_LIMIT
    limit = 4 * _widest(graph)
    visited: set[int] = set()
    ignored_ids = {id(m) for m in ignored + list(graph.IGNORED_LAYERS_IN_TRACING)}
    for module in list(graph.module2node):
        if id(module) in ignored_ids or id(module) in visited:
            continue
        if not isinstance(module, _ConvNd | nn.Linear):
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        fn = pruner.prune_out_channels
        if graph.module2node[module].type.name == "DEPTHWISE_CONV":
            fn = tp.prune_depthwise_conv_out_channels
        try:
            items = _closure(graph, module, fn, limit, deadline)
        except _Unproven as why:
            notes.append(f"{names.get(module, module)}: {why}; its channels are not pruned")
            visited.add(id(module))
            continue
        why = _mixed_widths(graph, items)
        if why:
            notes.append(f"{names.get(module, module)}: {why}; its channels are not pruned")
            visited.add(id(module))
            continue
        outputs = [n.module for n, h in items if graph.is_out_channel_pruning_fn(h)]
        visited.update(id(m) for m in outputs)
        if not any(id(m) in ignored_ids for m in outputs):
            yield module, items


def _closure(graph, root, fn, limit: int, deadline: float) -> dict:
    """Every (node, handler) the removal of all of ``root``'s output channels reaches."""
    from torch_pruning._helpers import _HybridIndex

    node = graph.module2node[root]
    n = graph.get_pruner_of_module(root).get_out_channels(root)
    start = [_HybridIndex(idx=i, root_idx=i) for i in range(n)]
    items: dict = {(node, fn): {(i, i) for i in range(n)}}
    stack = [(node, fn, start)]
    while stack:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"grouping the channels of this model did not finish in {TIME_LIMIT:.0f} s "
                f"(autograd graph of {len(graph.module2node):,} nodes); sparta refuses "
                "rather than hang: prune a smaller model or pass smaller example_inputs"
            )
        node, fn, idxs = stack.pop()
        _check_node(graph, node)
        weights = _weight_inputs(node)
        for dep in node.dependencies:
            if not dep.is_triggered_by(fn):
                continue
            if weights and dep.target.grad_fn in weights:
                continue  # computes the layer's own weight (e.g. weight standardisation)
            kinds = {_reshape_kind(n) for n in (node, dep.target) if n.type.name == "RESHAPE"}
            if "rearranges" in kinds:
                raise _Unproven(
                    f"coupled through {_op_name(dep.target)}, which rearranges the channels"
                )
            new = idxs
            for mapping in [] if "identity" in kinds else dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
                    if len(new) > limit:
                        raise _Unproven(
                            f"the channel mapping through {_op_name(dep.target)} grew to "
                            f"{len(new):,} entries (a reshape that mixes the channel dimension)"
                        )
            if not new:
                continue
            _check_width(graph, dep, new)
            key = (dep.target, dep.handler)
            pairs = {(int(i.idx), int(i.root_idx)) for i in new}
            seen = items.setdefault(key, set())
            if pairs <= seen:
                continue
            seen |= pairs
            stack.append((dep.target, dep.handler, new))
    return items


def _weight_inputs(node) -> set:
    """The autograd inputs of a convolution node that compute its weight and bias (not its
    input activation): a layer that computes its weight in its forward (timm's
    ``StdConv2d``/``ScaledStdConv2d`` standardise it) has such inputs, and they hold no
    channels of any activation."""
    grad_fn = node.grad_fn
    if not isinstance(node.module, _ConvNd) or grad_fn is None:
        return set()
    if not grad_fn.name().startswith("Convolution"):
        return set()
    return {f for f, _ in grad_fn.next_functions[1:] if f is not None}


def _mixed_widths(graph, items: dict) -> str | None:
    """Without a concatenation, split, slice or flatten on the way, every layer a group
    reaches sees the same number of channels; layers of different widths mean that a
    transpose or permute coupled another dimension (MLP-Mixer's token mixing)."""
    widths: dict[int, str] = {}
    for node, handler in items:
        kind = node.type.name
        if kind in ("CONCAT", "SPLIT", "SLICE", "UNBIND", "EXPAND"):
            return None
        if kind == "RESHAPE" and _reshape_kind(node) != "identity":
            return None
        if not isinstance(node.module, nn.Module) or kind == "ELEMENTWISE":
            continue
        out = graph.is_out_channel_pruning_fn(handler)
        try:
            width = (graph.get_out_channels if out else graph.get_in_channels)(node)
        except Exception:  # an operation without a width
            continue
        if isinstance(width, int):
            widths.setdefault(width, _op_name(node) if node.name is None else node.name)
    if len(widths) > 1:
        shown = ", ".join(f"{w} ({n.split(' ')[0]})" for w, n in list(widths.items())[:3])
        return f"couples layers of different widths ({shown}) through a transpose or permute"
    return None


def _check_width(graph, dep, idxs) -> None:
    """Indices that reach a layer must exist in it: else the mapping was a guess."""
    if not isinstance(dep.target.module, nn.Module) or dep.target.type.name == "ELEMENTWISE":
        return
    out = graph.is_out_channel_pruning_fn(dep.handler)
    try:
        width = (graph.get_out_channels if out else graph.get_in_channels)(dep.target)
    except Exception:  # an operation without a width: nothing to check
        return
    top = max(int(i.idx) for i in idxs)
    if width is not None and top >= width:
        raise _Unproven(
            f"the channel mapping reaches index {top} of {_op_name(dep.target)} "
            f"({'outputs' if out else 'inputs'} {width})"
        )


def _check_node(graph, node) -> None:
    """Raise :class:`_Unproven` for an operation whose channel mapping is a guess."""
    kind = node.type.name
    if node in graph.sparta_unmappable:
        raise _Unproven(f"coupled through {_op_name(node)}, whose channel mapping failed")
    if kind == "UNBIND":
        raise _Unproven(f"coupled through {_op_name(node)}, which splits q, k, v or heads apart")
    if kind == "EXPAND":
        raise _Unproven(f"coupled through {_op_name(node)}, a broadcast sparta cannot map")
    if kind == "SPLIT" and not _channel_split(node):
        raise _Unproven(
            f"coupled through {_op_name(node)}, a split along the channels whose sizes are "
            "fixed in the model's code"
        )
    if kind == "ELEMENTWISE" and any(k in _op_name(node).lower() for k in _MIXING):
        raise _Unproven(f"coupled through {_op_name(node)}, which mixes channels")


def _reshape_kind(node) -> str:
    """``"identity"`` for a reshape that keeps the channel dimension whole (positions merged
    or split: ``(N, C, H, W) -> (N, C, H*W)``, ``(N, H, W, C) -> (N*H*W, C)``), ``"flatten"``
    for ``(N, C, H, W) -> (N, C*H*W)``, else ``"rearranges"`` (channels split or mixed, as in
    a fused q/k/v projection or a channel shuffle). The layout (channels first or last) is
    that of the layer producing the tensor."""
    cached = getattr(node, "sparta_reshape", None)
    if cached is None:
        cached = node.sparta_reshape = _classify_reshape(node)
    return cached


def _classify_reshape(node) -> str:
    size_in = _saved_sizes(node.grad_fn)
    try:
        size_out = [int(s) for s in node.grad_fn._input_metadata[0].shape]
    except Exception:  # no shape recorded: cannot be proven
        return "rearranges"
    if size_in is None or len(size_in) < 2 or len(size_out) < 2:
        return "rearranges"
    if _is_flatten(node):
        return "flatten"
    layout = _layout(node)
    if layout == "last" and size_in[-1] == size_out[-1]:
        return "identity"
    if layout == "first" and size_in[:2] == size_out[:2] and len(size_out) >= 3:
        return "identity"
    return "rearranges"


def _layout(node, depth: int = 64) -> str | None:
    """``"first"`` (channels on dim 1) or ``"last"`` for the tensor entering ``node``, from the
    nearest producing layer upstream through single-input operations, and through operations
    of several inputs whose inputs all have that layout (a gated MLP's product, a residual
    addition); ``None`` if unknown (a permute or transpose on the way, inputs that disagree,
    too far)."""
    for _ in range(depth):
        inputs = [n for n in node.inputs if n.type.name != "PARAMETER"]
        if len(inputs) != 1:
            return _agreed_layout(node, inputs, depth)
        node = inputs[0]
        own = _own_layout(node)
        if own is not _UPSTREAM:
            return own
    return None


def _agreed_layout(node, inputs: list, depth: int) -> str | None:
    """The layout all ``inputs`` of ``node`` have (each traced as :func:`_layout` does from
    its own producer), or ``None``; remembered per node, so that a residual stream is walked
    once, not once per path."""
    cached = getattr(node, "sparta_layout", False)
    if cached is not False:
        return cached
    node.sparta_layout = None  # a cycle or a deep revisit reads as unknown
    if not inputs or depth <= 0:
        return None
    layouts = {_layout_of(n, depth - 1) for n in inputs}
    node.sparta_layout = layouts.pop() if len(layouts) == 1 else None
    return node.sparta_layout


def _layout_of(node, depth: int) -> str | None:
    """The layout of the tensor ``node`` produces (its own layer's, else traced upstream)."""
    own = _own_layout(node)
    return _layout(node, depth) if own is _UPSTREAM else own


#: :func:`_own_layout`'s answer for a node that keeps its input's layout.
_UPSTREAM = object()


def _own_layout(node):
    """``"last"`` / ``"first"`` for a node whose module fixes the channel dim, ``None`` where
    the layout becomes unknown (a permute, a transpose, a reshape that moves channels), else
    :data:`_UPSTREAM` (the node's input decides)."""
    module = node.module
    if isinstance(module, nn.Linear | nn.LayerNorm | nn.MultiheadAttention | nn.Embedding):
        return "last"
    if isinstance(module, _ConvNd | nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
        return "first"
    name = _op_name(node).lower()
    if "permute" in name or "transpose" in name or name.startswith("tbackward"):
        return None
    if node.type.name == "RESHAPE" and _reshape_kind(node) != "identity":
        return None
    return _UPSTREAM


def _is_flatten(node) -> bool:
    """A reshape of ``(N, C, *rest)`` into ``(N, C * prod(rest))``: channel ``c`` becomes
    entries ``c * prod(rest) ...``; torch-pruning maps exactly that (or nothing for ``rest``
    of ones). Any other reshape rearranges channels in ways it only guesses."""
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    size = _saved_sizes(node.grad_fn)
    if size is None or len(size) < 2:
        return False
    rest = math.prod(int(s) for s in size[2:])
    strides = {
        m._stride
        for other in [node, *node.inputs, *node.outputs]
        for dep in other.dependencies
        if dep.target is node or dep.source is node
        for m in dep.index_mapping
        if isinstance(m, _FlattenIndexMapping)
    }
    try:
        size_out = [int(s) for s in node.grad_fn._input_metadata[0].shape]
    except Exception:
        return False
    if size_out != [size[0], size[1] * rest]:
        return False
    return not strides if rest == 1 else strides == {rest}


def _saved_sizes(grad_fn):
    for attr in ("_saved_self_sym_sizes", "_saved_self_sizes"):
        size = getattr(grad_fn, attr, None)
        if size is not None:
            return [int(s) for s in size]
    return None


def _channel_split(node) -> bool:
    size = _saved_sizes(node.grad_fn)
    dim = getattr(node.grad_fn, "_saved_dim", None)
    if size is None or dim is None:
        return False
    dim = dim % len(size) if -len(size) <= dim < len(size) else dim
    # A split along the channels is not proven: its sizes are numbers in the model's code
    # (CSPNet's ``x.split(self.expand_chs // 2, dim=1)``, a ``chunk(2, dim=1)``) that the
    # compact model would still use after channels are removed.
    return dim not in (1, len(size) - 1)  # a split along positions: channels untouched


def _op_name(node) -> str:
    grad_fn = getattr(node, "grad_fn", None)
    name = grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else None
    return name or type(node.module).__name__


def _widest(graph) -> int:
    """The largest channel count any layer sees (flattened Linear inputs included)."""
    widest = 1
    for module in graph.module2node:
        if isinstance(module, nn.Linear):
            widest = max(widest, module.in_features, module.out_features)
        elif isinstance(module, _ConvNd):
            widest = max(widest, module.in_channels, module.out_channels)
        elif isinstance(module, nn.Parameter | torch.Tensor):
            widest = max(widest, *module.shape) if module.dim() else widest
    return widest
