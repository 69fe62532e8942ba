"""Counting what a task learns, in two accountings (design.md, "learned parameters per task").

``"stored"``: what the task file holds. Per adapted layer the adapter's parameters that still
reach the output under the masks (SPLoRA r * (kept in + kept out), SPPaRA kept in x kept out),
plus the kept entries of the layer's bias; masked tensors (norms, the head's kept columns)
their kept entries; every other trainable tensor in full. ``"paper"``: Table 1's, which also
counts every norm's affine parameters and the whole head, pruned or not. Frozen tensors are
the shared base and count nothing.

Also here: a MAC counter that understands wrapped and masked models, and side-by-side latency.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from .adapters.attention import AdaptedWeight, MaskedBias
from .adapters.base import Adapter
from .adapters.layer import AdaptedLayer
from .errors import ConfigError
from .heads import _inside, head_of
from .inputs import check_nonempty, tensors
from .masks import ChannelMask, SharedMask, attention_kept, kept_weights, submodule
from .utils import NORMS, batch_size, call, evaluating

ACCOUNTINGS = ("stored", "paper")


def learned_parameters(model: nn.Module, accounting: str = "stored") -> int:
    """Number of parameters the task learns. Frozen tensors are the shared base and count
    nothing; two accountings of the trainable ones:

    * ``"stored"`` (the default): what the task file holds. Adapters count on kept channels
      only (SPLoRA ``r * (kept in + kept out)``, SPPaRA ``kept in * kept out``, any registered
      adapter its own ``num_learned()``), masked tensors (norms, biases, the head, every layer
      of a fine-pruned model) their kept entries, every other trainable tensor in full.
    * ``"paper"``: as Table 1 of the paper counts. The same, except that the affine parameters
      of *every* norm layer and *every* trainable parameter of the head count in full, pruned
      channels and columns included (the paper's r32-minus-r8 counts leave a constant: all
      BatchNorm plus all fc parameters of ResNet-50, at every density).

    The head is the layer(s) :func:`sparta.wrap` kept plain as the head (recorded on the
    model), or, for a model ``wrap`` never saw (fine-pruning), the last registered ``Linear``
    or non-transposed conv (:func:`sparta.heads.head_of`). Unpruned, both accountings agree.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"learned_parameters expects a torch.nn.Module, got {type(model).__name__}")
    if accounting not in ACCOUNTINGS:
        raise ConfigError(
            f"accounting must be one of {', '.join(map(repr, ACCOUNTINGS))}, got {accounting!r}: "
            "'stored' counts what the task file holds, 'paper' counts as the paper's Table 1 "
            "(every norm and the whole head in full)"
        )
    whole = whole_modules(model) if accounting == "paper" else {}
    counted: set[int] = set()
    total = _count_trainable([p for m in whole.values() for p in m.parameters()], counted)
    skip = {id(m) for m in whole.values()}
    for module in model.modules():
        if id(module) in skip:
            continue
        if isinstance(module, AdaptedLayer):
            if _trainable(module.adapter):
                total += module.adapter.num_learned()
            bias = module.base.bias
            if bias is not None and bias.requires_grad:
                total += int(module.mask_out.count_nonzero())
            counted.update(id(p) for p in module.parameters())
        elif parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                total += _parametrized_learned(plist)
                counted.update(id(p) for p in plist.parameters())
    return total + _count_trainable(model.parameters(), counted)


def whole_modules(model: nn.Module, head: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The modules whose trainable parameters the paper's accounting counts in full: every
    norm layer and the head (``head``: its module names; default :func:`sparta.heads.head_of`),
    with everything inside them."""
    head = head_of(model) if head is None else list(head)
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, NORMS) or (head and _inside(name, head))
    }


def _count_trainable(params: Iterable[nn.Parameter], counted: set[int]) -> int:
    """Entries of the trainable ``params`` not yet in ``counted`` (which they are added to)."""
    total = 0
    for p in params:
        if p.requires_grad and id(p) not in counted:
            total += p.numel()
        counted.add(id(p))
    return total


def adapter_parameters(model: nn.Module) -> int:
    """Of :func:`learned_parameters`, the part the adapters learn (kept channels only; the same
    in both accountings): 0 for a model without trainable adapters (the baselines)."""
    return sum(
        m.num_learned()
        for m in model.modules()
        if isinstance(m, Adapter) and any(p.requires_grad for p in m.parameters())
    )


def _parametrized_learned(plist) -> int:
    """Learned entries of one parametrised tensor: adapters count their own way, masks keep
    only the entries they let through."""
    original = plist.original
    for fn in plist:
        if isinstance(fn, AdaptedWeight):
            return fn.num_learned() if _trainable(fn) else 0
        if isinstance(fn, MaskedBias | ChannelMask | SharedMask):
            if not original.requires_grad:
                return 0
            return fn.num_kept() if isinstance(fn, MaskedBias) else fn.kept(original.shape)
    return original.numel() if original.requires_grad else 0


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


# -- multiply-accumulates ----------------------------------------------------------------------
class MacCounter:
    """Multiply-accumulates per example of every Linear, ConvNd and MultiheadAttention,
    honouring channel masks (a masked channel costs nothing, as in the compact model).

    Positions per layer are recorded once with ``example_inputs``; :meth:`count` then reads
    only the masks, so it is cheap to call after every pruning step. Elementwise operations,
    norms and pooling are not counted (as in torch-pruning's and fvcore's conventions).
    """

    def __init__(self, model: nn.Module, example_inputs):
        check_nonempty(example_inputs, "example_inputs")  # MACs per sample of no sample
        self.positions: dict[str, float] = {}
        self.attention: dict[str, tuple[float, float]] = {}
        batch = batch_size(example_inputs)
        hooks, layers = [], {}
        for name, m in model.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                hooks.append(m.register_forward_hook(self._attention_hook(name, batch)))
            elif isinstance(m, AdaptedLayer | nn.Linear | _ConvNd) and not _in_attention(
                model, name
            ):
                hooks.append(m.register_forward_hook(self._layer_hook(name, batch)))
                layers[name] = m
        try:
            with evaluating(model):
                # Some modules never call a layer but read its ``.weight`` (torchvision's
                # Swin attention does F.linear(x, self.qkv.weight)): seen by the weight passed.
                weights = {id(m.weight): name for name, m in layers.items()}
                with _WeightReads(weights, self.positions, batch):
                    call(model, example_inputs)
        finally:
            for h in hooks:
                h.remove()

    def _layer_hook(self, name: str, batch: int):
        def hook(module, inputs, output):
            out = output if isinstance(output, torch.Tensor) else output[0]
            width = out.shape[1] if isinstance(_base(module), _ConvNd) else out.shape[-1]
            self.positions[name] = out.numel() / width / batch

        return hook

    def _attention_hook(self, name: str, batch: int):
        def hook(module, args, output):
            query, key = args[0], args[1]
            seq = 1 if module.batch_first else 0
            self.attention[name] = (query.shape[seq], key.shape[seq])

        return hook

    def count(self, model: nn.Module) -> int:
        total = 0.0
        for name, positions in self.positions.items():
            total += positions * kept_weights(submodule(model, name))
        for name, (lq, lk) in self.attention.items():
            mha = submodule(model, name)
            total += attention_macs(mha, attention_kept(mha), lq, lk)
        return int(round(total))


class _WeightReads(TorchFunctionMode):
    """Records the positions of every linear/convolution call whose weight is a known layer's
    (``weights``: tensor id -> layer name), however the call was made. Under ``no_grad`` an
    adapted layer's ``.weight`` is its cached fused tensor, so identity is stable in one pass."""

    _LINEAR = (F.linear,)
    _CONV = (F.conv1d, F.conv2d, F.conv3d, torch.convolution, torch._convolution)

    def __init__(self, weights: dict[int, str], positions: dict[str, float], batch: int):
        super().__init__()
        self.weights, self.positions, self.batch = weights, positions, batch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self._LINEAR or func in self._CONV:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.weights.get(id(weight))
            if name is not None and isinstance(out, Tensor) and out.dim():
                width = out.shape[1] if func in self._CONV else out.shape[-1]
                self.positions.setdefault(name, out.numel() / width / self.batch)
        return out


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, AdaptedLayer) else module


def _in_attention(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), nn.MultiheadAttention)


def attention_macs(
    mha: nn.MultiheadAttention,
    kept: tuple[float, float, float, float],
    lq: float,
    lk: float,
    products: bool = True,
) -> float:
    """MACs per example of ``mha`` with ``kept`` q/k/v rows and out columns
    (:func:`sparta.masks.attention_kept`), ``lq`` queries and ``lk`` keys: the projections,
    plus the two attention products unless ``products`` is false (with ``lq = lk = 1`` and no
    products: the kept weight entries)."""
    kq, kk, kv, ko = kept
    e = mha.embed_dim
    projections = lq * kq * e + lk * kk * mha.kdim + lk * kv * mha.vdim + lq * ko * e
    if not products:
        return projections
    # q.k over the dims kept in both, then the weighted sum of v (masks are head-aligned).
    return projections + lq * lk * min(kq, kk) + lq * lk * kv


def latency(
    models: dict[str, nn.Module],
    inputs,
    repeats: int = 20,
    warmup: int = 3,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, float]:
    """Median seconds per forward (inference mode) of each model on ``inputs``.

    The models are timed interleaved, one call of each in turn, so that load on a shared
    machine affects them alike; ``warmup`` rounds first (CPU backends set up per input shape).
    ``progress`` may wrap the repeat loop (e.g. ``rich.progress.track``).
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    cuda = any(t.is_cuda for t in tensors(inputs))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in models}
    rounds = range(repeats) if progress is None else progress(range(repeats))
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                call(model, inputs)
        for _ in rounds:
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                call(model, inputs)
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
