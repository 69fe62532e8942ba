"""``AdaptedLayer``: a frozen ``nn.Linear`` or ``nn.ConvNd`` plus an adapter, one code path.

Both paths compute the base layer with ``(W + delta) * M`` and ``b * mask_out``
(tested to agree within 1e-5 relative, fp32):

* gradient path (whenever autograd must reach the adapter or bias): through ``DeltaLayerFn``,
  whose backward forms no gradient for the frozen weight and only thin ones for the adapter,
  so a training step costs less than full fine-tuning (a low-rank delta runs fused into the
  weight or as a branch beside the layer, whichever costs less: see ``delta_fn``);
* fused path (otherwise, e.g. under ``torch.no_grad()``): the fused weight is cached until a
  weight, adapter or mask changes, so inference runs at plain-layer speed.

Torch-layer subclasses are adapted only where sparta reproduces their forward exactly (see
``forms``: timm's dynamic "same" padding and weight standardisation); a standardised weight
takes the plain autograd path, since its delta's gradient passes through the standardisation.

Code that reads ``layer.weight`` / ``layer.bias`` instead of calling the layer (torchvision's
Swin attention does ``F.linear(x, self.qkv.weight, ...)``) gets the effective tensors: what the
layer applies, the same numbers ``sparta.fuse`` stores, differentiable to the adapter and the
bias when gradients are on. The frozen tensor is ``layer.base.weight``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..errors import ConfigError, NotAdaptableError
from .base import Adapter, get_adapter
from .delta_fn import DeltaLayerFn, Geometry, autocast_off
from .forms import form_of, form_reason

#: Optimiser steps taken in this process, by any ``torch.optim`` optimiser (counted once a
#: :class:`TensorMemo` exists). Fused optimisers (``AdamW(fused=True)``, the Hugging Face
#: Trainer's default "adamw_torch_fused") update the parameters without incrementing their
#: version counters (torch 2.x), so a memo also keys on this count.
_OPTIMIZER_STEPS = [0]
_STEP_HOOK: list = []


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


def _watch_optimizer_steps() -> None:
    """Count optimiser steps from now on (once per process; not at import: no side effect)."""
    if not _STEP_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK.append(register_optimizer_step_post_hook(_count_step))


class TensorMemo:
    """Holds a value computed from some tensors until one of them is replaced or edited.

    Edits are seen through each tensor's version counter, which every in-place operation
    (``mask[i] = 0``, ``load_state_dict``, most optimiser steps) increments, and through the
    process's count of optimiser steps (fused optimisers leave the version counters alone);
    replaced tensors (``.to()``, a new ``nn.Parameter``) are seen by identity.
    """

    def __init__(self) -> None:
        self._key: list[tuple[Tensor, int]] = []
        self._step = -1
        self._value = None
        _watch_optimizer_steps()

    def get(self, tensors: Sequence[Tensor], compute: Callable[[], object]):
        if torch.compiler.is_compiling():
            # A compiled graph recomputes the value in place (the compiler fuses it); reading
            # version counters and storing Python state would guard or break the graph.
            with torch.no_grad():
                return compute()
        key = [(t, t._version) for t in tensors]
        same = (
            self._step == _OPTIMIZER_STEPS[0]
            and len(key) == len(self._key)
            and all(a is b and va == vb for (a, va), (b, vb) in zip(key, self._key))
        )
        if not same:
            # Built outside inference mode and without a graph, so the value can be reused in
            # any later call, including ones that take gradients w.r.t. the input.
            with torch.inference_mode(False), torch.no_grad():
                self._value = compute()
            self._key, self._step = key, _OPTIMIZER_STEPS[0]
        return self._value

    def clear(self) -> None:
        self._key, self._step, self._value = [], -1, None

    def __deepcopy__(self, memo):  # caches are not state: a copy starts empty
        return TensorMemo()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def layer_geometry(layer: nn.Module) -> tuple[str, int, int, int]:
    """``(kind, out_features, in_features, groups)`` of a Linear or (non-transposed) ConvNd."""
    if isinstance(layer, nn.Linear):
        return "linear", layer.out_features, layer.in_features, 1
    if isinstance(layer, _ConvNd) and not layer.transposed:
        return "conv", layer.out_channels, layer.in_channels, layer.groups
    raise NotAdaptableError(f"expected nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}")


def centre_reason(layer: nn.Module) -> str | None:
    """Why a conv has no centre tap for a pointwise delta (even kernel size), else ``None``."""
    if isinstance(layer, _ConvNd):
        even = [k for k in layer.kernel_size if k % 2 == 0]
        if even:
            size = "x".join(map(str, layer.kernel_size))
            return f"kernel {size} has an even size, so there is no centre tap for the delta"
    return None


def adapt_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` (a Linear or non-transposed ConvNd) cannot be adapted, else ``None``:
    no centre tap, or a forward sparta does not reproduce exactly (checked on a probe input
    for registered subclasses, see ``forms``)."""
    return form_reason(layer) or centre_reason(layer) or _probe_reason(layer)


_PROBED: dict[tuple, str | None] = {}


def _probe_reason(layer: nn.Module) -> str | None:
    """Run ``layer``'s own forward and sparta's recipe for it on probe inputs (two sizes, one
    odd); a difference above rounding means the recipe is wrong for this layer. The answer
    depends on the class and hyper-parameters only, so it is kept per configuration."""
    form = form_of(layer)
    weight = layer.weight
    if form.is_plain and type(layer).__module__.startswith("torch.nn."):
        return None
    if weight.device.type == "meta" or not weight.is_floating_point():
        return None
    key = (type(layer), tuple(weight.shape), weight.dtype, _config(layer))
    if key not in _PROBED:
        _PROBED[key] = _probe(layer, form)
    return _PROBED[key]


def _config(layer: nn.Module) -> tuple:
    names = ("stride", "padding", "dilation", "groups", "padding_mode", "same_pad", "eps")
    return tuple(str(getattr(layer, n, None)) for n in names)


def _probe(layer: nn.Module, form) -> str | None:
    geometry = _geometry(layer)
    gen = torch.Generator().manual_seed(0)
    w = layer.weight
    if geometry.spatial_dims == 0:
        sizes = [(2, layer.in_features)]
    else:
        span = [(k - 1) * d + 2 * s + 2 for k, s, d in zip(*_kernel_args(layer))]
        sizes = [(1, layer.in_channels, *span), (1, layer.in_channels, *(n + 1 for n in span))]
    tol = 1e-4 if torch.finfo(w.dtype).bits >= 32 else 2e-2
    with torch.no_grad(), autocast_off(w.device):
        for size in sizes:
            x = torch.randn(size, generator=gen).to(device=w.device, dtype=w.dtype)
            want = layer(x)
            weight = w if form.standardise is None else form.standardise(layer, w)
            got = geometry.layer(x if form.pad is None else form.pad(layer, x), weight, layer.bias)
            if got.shape != want.shape:
                return (
                    f"sparta's recipe for {form.name} gives {tuple(got.shape)}, its forward "
                    f"{tuple(want.shape)} (probe input {tuple(size)})"
                )
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
            if not err <= tol:
                return (
                    f"sparta's recipe for {form.name} differs from its forward by {err:.2g} "
                    f"relative (probe input {tuple(size)}), so it is left frozen"
                )
    return None


def _kernel_args(layer: nn.Module) -> tuple:
    return layer.kernel_size, layer.stride, layer.dilation


class AdaptedLayer(nn.Module):
    """A frozen Linear/ConvNd (``self.base``) with a task adapter (``self.adapter``).

    ``base.weight`` is frozen and never modified; ``base.bias`` is the task's bias (trainable
    unless frozen by the caller). Masks live on the adapter: ``mask_out`` zeroes output
    channels in weight, delta and bias; ``mask_in`` zeroes input channels. ``weight`` and
    ``bias`` read as the effective tensors (module docstring).
    """

    def __init__(
        self, base: nn.Module, adapter: str | Adapter = "splora", name: str = "", **options
    ):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"expected an nn.Module to adapt, got {type(base).__name__}")
        label = f"layer {name!r}" if name else f"this {type(base).__name__}"
        kind, out_f, in_f, groups = layer_geometry(base)
        reason = adapt_reason(base)
        if reason:
            raise NotAdaptableError(f"cannot adapt {label}: {reason}")
        if isinstance(adapter, str):
            cls = get_adapter(adapter)
            if kind not in cls.kinds:
                raise NotAdaptableError(
                    f"cannot adapt {label}: adapter {cls.name!r} supports {', '.join(cls.kinds)}"
                    f" layers, not {kind}"
                )
            options = cls.resolve_options(options)
            why = cls.unsupported_reason(out_f, in_f, groups, options)
            if why:
                raise NotAdaptableError(f"cannot adapt {label}: {why}")
            adapter = cls(out_f, in_f, groups, **options)
        elif options:
            raise ConfigError("options are only accepted together with an adapter name")
        if (adapter.out_features, adapter.in_features, adapter.groups) != (out_f, in_f, groups):
            raise ConfigError(
                f"adapter shape (out={adapter.out_features}, in={adapter.in_features}, "
                f"groups={adapter.groups}) does not match {label} "
                f"(out={out_f}, in={in_f}, groups={groups})"
            )
        self.base = base
        self.adapter = adapter.to(device=base.weight.device, dtype=base.weight.dtype)
        base.weight.requires_grad_(False)
        self.geometry = _geometry(base)
        self.form = form_of(base)
        self._masked_weight = TensorMemo()
        self._fused = TensorMemo()

    @property
    def mask_out(self) -> Tensor:
        return self.adapter.mask_out

    @property
    def mask_in(self) -> Tensor:
        return self.adapter.mask_in

    def _weight_mask(self) -> Tensor:
        matrix = self.adapter.mask_matrix()
        return matrix.reshape(*matrix.shape, *([1] * self.geometry.spatial_dims))

    def fused_weight(self) -> tuple[Tensor, Tensor | None]:
        """``((W + delta) * M, b * mask_out)``; differentiable when called with grad enabled.
        Formed in the parameters' dtype even under autocast (the layer call casts it).
        A standardising layer's weight is ``S((W + delta) * M) * M`` (``forms`` says why)."""
        with autocast_off(self.base.weight.device):
            delta = self.adapter.delta()
        mask = self._weight_mask()
        weight = self.geometry.with_delta(self.base.weight, delta) * mask
        if self.form.standardise is not None:
            with autocast_off(weight.device):
                weight = self.form.standardise(self.base, weight) * mask
        bias = self.base.bias
        return weight, (None if bias is None else bias * self.mask_out)

    def _effective(self) -> tuple[Tensor, Tensor | None]:
        """:meth:`fused_weight`: differentiable when gradients must reach the adapter or the
        bias, else the cached value (rebuilt when a weight, adapter or mask changes)."""
        if self._needs_grad():
            return self.fused_weight()
        keys = [self.base.weight, *self.adapter.parameters(), *self.adapter.buffers()]
        keys += [] if self.base.bias is None else [self.base.bias]
        return self._fused.get(keys, self.fused_weight)

    @property
    def weight(self) -> Tensor:
        """The effective weight the layer applies (frozen weight: ``base.weight``)."""
        return self._effective()[0]

    @property
    def bias(self) -> Tensor | None:
        """The effective bias, ``b * mask_out`` (the task's parameter: ``base.bias``)."""
        if self.base.bias is None or not self._needs_grad():
            return self._effective()[1]
        return self.base.bias * self.mask_out

    def fused_layer(self) -> nn.Module:
        """A plain layer computing what this one computes (no adapter, masks baked in): a
        copy of the base layer holding :meth:`fused_weight`; a standardising layer becomes a
        class that applies its stored weight as is (``LayerForm.plain_class``)."""
        with torch.no_grad():
            weight, bias = self.fused_weight()
        plain = copy.copy(self.base)  # same hyper-parameters; tensors replaced below
        for slot in ("_parameters", "_buffers", "_modules"):
            setattr(plain, slot, dict(getattr(plain, slot)))
        cls = self.form.plain_class(self.base)
        if cls is not type(plain):
            plain.__class__ = cls
            for extra in set(plain._parameters) - {"weight", "bias"}:  # e.g. a gain
                del plain._parameters[extra]
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            plain.bias = nn.Parameter(bias, requires_grad=self.base.bias.requires_grad)
        return plain

    def _needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        bias = self.base.bias
        return (bias is not None and bias.requires_grad) or any(
            p.requires_grad for p in self.adapter.parameters()
        )

    def _pad(self, x: Tensor) -> Tensor:
        """Apply a non-zero padding mode up front, as ``nn.ConvNd`` does."""
        mode = getattr(self.base, "padding_mode", "zeros")
        if mode == "zeros":
            return x
        return F.pad(x, self.base._reversed_padding_repeated_twice, mode=mode)

    def forward(self, x: Tensor) -> Tensor:
        x = self._pad(x)
        if self.form.pad is not None:
            x = self.form.pad(self.base, x)
        if self.form.standardise is not None or not self._needs_grad():
            weight, bias = self._effective()
            return self.geometry.layer(x, weight, bias)
        weight = self._masked_weight.get(
            [self.base.weight, *self.adapter.masks()], self._masked_base_weight
        )
        bias = None if self.base.bias is None else self.base.bias * self.mask_out
        with autocast_off(x.device):  # factors in the parameters' dtype; the kernel casts
            left, right = self.adapter.factors()
        if self.geometry.spatial_dims == 0 and x.dim() > 2:
            # F.linear of an N-d input returns a view, and a custom Function may not return a
            # view that the caller then edits in place (Swin V2 does): run it on the 2-d
            # matrix and reshape outside, where autograd tracks the view as usual.
            lead = x.shape[:-1]
            y = DeltaLayerFn.apply(
                x.reshape(-1, x.shape[-1]), weight, bias, left, right, self.geometry
            )
            return y.view(*lead, y.shape[-1])
        return DeltaLayerFn.apply(x, weight, bias, left, right, self.geometry)

    def _masked_base_weight(self) -> Tensor:
        # Nothing pruned: no copy (eager only; a compiled graph multiplies, without reading
        # the masks' values in Python).
        if not torch.compiler.is_compiling() and all(bool(m.all()) for m in self.adapter.masks()):
            return self.base.weight
        return self.base.weight * self._weight_mask()

    def extra_repr(self) -> str:
        return f"adapter={self.adapter.name!r}"


def _geometry(layer: nn.Module) -> Geometry:
    if isinstance(layer, nn.Linear):
        return Geometry()
    d = len(layer.kernel_size)
    if layer.padding_mode != "zeros" or layer.padding == "valid":
        padding = (0,) * d  # non-zero modes pad the input before the kernel (see _pad)
    elif layer.padding == "same":  # odd kernels only (even ones are refused): symmetric
        padding = tuple(dl * (k - 1) // 2 for dl, k in zip(layer.dilation, layer.kernel_size))
    else:
        padding = tuple(layer.padding)
    return Geometry(
        d,
        tuple(layer.stride),
        padding,
        tuple(layer.dilation),
        tuple(layer.kernel_size),
        layer.groups,
    )
