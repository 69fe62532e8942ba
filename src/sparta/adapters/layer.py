"""``AdaptedLayer``: a frozen ``nn.Linear`` or ``nn.ConvNd`` plus an adapter, one code path.

Two ways to compute the same function (tested to agree within 1e-5 relative, fp32):

* gradient path (whenever autograd must reach the adapter or bias): the frozen layer runs on
  its masked weight, which needs no weight gradient, and the adapter runs beside it on the
  input sampled at the kernel's centre tap (a strided 1x1 branch). A training step therefore
  costs less than full fine-tuning.
* fused path (otherwise, e.g. under ``torch.no_grad()``): one call of the base layer with
  ``(W + delta) * M`` and ``b * mask_out``, cached until a weight, adapter or mask changes, so
  inference runs at plain-layer speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..errors import ConfigError, NotAdaptableError
from .base import Adapter, get_adapter


class TensorMemo:
    """Holds a value computed from some tensors until one of them is replaced or edited.

    Edits are seen through each tensor's version counter, which every in-place operation
    (an optimiser step, ``mask[i] = 0``, ``load_state_dict``) increments; replaced tensors
    (``.to()``, a new ``nn.Parameter``) are seen by identity.
    """

    def __init__(self) -> None:
        self._key: list[tuple[Tensor, int]] = []
        self._value = None

    def get(self, tensors: Sequence[Tensor], compute: Callable[[], object]):
        key = [(t, t._version) for t in tensors]
        same = len(key) == len(self._key) and all(
            a is b and va == vb for (a, va), (b, vb) in zip(key, self._key)
        )
        if not same:
            # Built outside inference mode and without a graph, so the value can be reused in
            # any later call, including ones that take gradients w.r.t. the input.
            with torch.inference_mode(False), torch.no_grad():
                self._value = compute()
            self._key = key
        return self._value

    def clear(self) -> None:
        self._key, self._value = [], None

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
    raise NotAdaptableError(
        f"expected nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}"
    )


def centre_reason(layer: nn.Module) -> str | None:
    """Why a conv has no centre tap for a pointwise delta (even kernel size), else ``None``."""
    if isinstance(layer, _ConvNd):
        even = [k for k in layer.kernel_size if k % 2 == 0]
        if even:
            size = "x".join(map(str, layer.kernel_size))
            return f"kernel {size} has an even size, so there is no centre tap for the delta"
    return None


class AdaptedLayer(nn.Module):
    """A frozen Linear/ConvNd (``self.base``) with a task adapter (``self.adapter``).

    ``base.weight`` is frozen and never modified; ``base.bias`` is the task's bias (trainable
    unless frozen by the caller). Masks live on the adapter: ``mask_out`` zeroes output
    channels in weight, delta and bias; ``mask_in`` zeroes input channels.
    """

    def __init__(self, base: nn.Module, adapter: str | Adapter = "splora", name: str = "", **options):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"expected an nn.Module to adapt, got {type(base).__name__}")
        label = f"layer {name!r}" if name else f"this {type(base).__name__}"
        kind, out_f, in_f, groups = layer_geometry(base)
        reason = centre_reason(base)
        if reason:
            raise NotAdaptableError(f"cannot adapt {label}: {reason}")
        if isinstance(adapter, str):
            cls = get_adapter(adapter)
            if kind not in cls.kinds:
                raise NotAdaptableError(
                    f"cannot adapt {label}: adapter {cls.name!r} supports {', '.join(cls.kinds)}"
                    f" layers, not {kind}"
                )
            cls.check_options(options)
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
        self.spatial_dims = 0 if kind == "linear" else len(base.kernel_size)
        self._masked_weight = TensorMemo()
        self._fused = TensorMemo()

    # -- masks -----------------------------------------------------------------------------------
    @property
    def mask_out(self) -> Tensor:
        return self.adapter.mask_out

    @property
    def mask_in(self) -> Tensor:
        return self.adapter.mask_in

    def _weight_mask(self) -> Tensor:
        matrix = self.adapter.mask_matrix()
        return matrix.reshape(*matrix.shape, *([1] * self.spatial_dims))

    # -- weights -----------------------------------------------------------------------------------
    def _centre(self) -> tuple:
        """Index of the kernel's centre tap in the weight tensor."""
        return (slice(None), slice(None), *(k // 2 for k in getattr(self.base, "kernel_size", ())))

    def fused_weight(self) -> tuple[Tensor, Tensor | None]:
        """``((W + delta) * M, b * mask_out)``; differentiable when called with grad enabled."""
        weight = self.base.weight.clone()
        weight[self._centre()] += self.adapter.delta()
        weight = weight * self._weight_mask()
        bias = self.base.bias
        return weight, (None if bias is None else bias * self.mask_out)

    def _cache_keys(self) -> list[Tensor]:
        return [self.base.weight, *self.adapter.parameters(), *self.adapter.buffers()] + (
            [] if self.base.bias is None else [self.base.bias]
        )

    def _needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        bias = self.base.bias
        return (bias is not None and bias.requires_grad) or any(
            p.requires_grad for p in self.adapter.parameters()
        )

    # -- forward -----------------------------------------------------------------------------------
    def _call_base(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.spatial_dims == 0:
            return F.linear(x, weight, bias)
        return self.base._conv_forward(x, weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self._needs_grad():
            weight, bias = self._fused.get(self._cache_keys(), self.fused_weight)
            return self._call_base(x, weight, bias)
        weight = self._masked_weight.get(
            [self.base.weight, self.mask_out, self.mask_in], self._masked_base_weight
        )
        bias = None if self.base.bias is None else self.base.bias * self.mask_out
        out = self._call_base(x, weight, bias)
        branch = self.adapter.apply(self._centre_taps(x), self.spatial_dims, self._stride())
        if self.spatial_dims:
            branch = _crop_to(branch, out.shape[2:])
        return out + branch

    def _masked_base_weight(self) -> Tensor:
        if bool(self.mask_out.all()) and bool(self.mask_in.all()):
            return self.base.weight  # nothing pruned: no copy
        return self.base.weight * self._weight_mask()

    def _stride(self):
        return getattr(self.base, "stride", 1)

    def _centre_taps(self, x: Tensor) -> Tensor:
        """Shift ``x`` so that a strided 1x1 conv reads what the kernel's centre tap reads."""
        if self.spatial_dims == 0:
            return x
        conv = self.base
        offsets = [d * (k - 1) // 2 - p for d, k, p in zip(conv.dilation, conv.kernel_size, _padding(conv))]
        if any(o < 0 for o in offsets):
            # The centre tap reads into the padding: pad by the shortfall in the layer's own
            # mode (reflect/replicate/circular values at those positions do not depend on the
            # total padding amount).
            pad = [v for o in reversed(offsets) for v in (max(-o, 0),) * 2]
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, pad, mode=mode)
            offsets = [max(o, 0) for o in offsets]
        for dim, o in enumerate(offsets):
            if o:
                x = x.narrow(2 + dim, o, x.shape[2 + dim] - o)
        return x

    def extra_repr(self) -> str:
        return f"adapter={self.adapter.name!r}"


def _padding(conv: _ConvNd) -> tuple[int, ...]:
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":  # odd kernels only (even ones are refused): symmetric
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def _crop_to(x: Tensor, size: torch.Size) -> Tensor:
    for dim, n in enumerate(size):
        if x.shape[2 + dim] != n:
            x = x.narrow(2 + dim, 0, n)
    return x
