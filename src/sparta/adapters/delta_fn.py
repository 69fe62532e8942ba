"""The training-path kernel: a frozen Linear/ConvNd plus a learned centre-tap delta.

``DeltaLayerFn`` computes ``layer(x; W + centre(delta), b)`` with a single call of the layer,
so the forward costs what the plain layer costs. Its backward never forms a gradient for the
frozen weight ``W`` (unless the caller unfroze it), and obtains the delta's gradient cheaply:

* low-rank ``delta = L @ R`` (SPLoRA, groups=1): four thin products over the centre-tap
  input, ``r * 2 * (in + out)`` multiply-adds per output position (LoRA's gradient, Hu et al.),
  in the activations' own memory layout (``lowrank``);
* any other delta: the weight gradient of a strided 1x1 layer over the centre-tap input,
  ``out * in / groups`` per position, i.e. 1/k^d of a full weight gradient.

A low-rank delta has a second exact form, chosen per call by cost (:func:`_branch_form`): a
branch beside the frozen layer, ``layer(x; W) + L (R x_c)``, which never rebuilds the weight;
late layers of a CNN (large weights, few output positions) take it.

Doing the adapter branch as separate modules instead (PEFT, the original SPA code) pays
for a second forward, activation-sized additions and a second input gradient, which made a
training step slower than full fine-tuning.

Mixed precision: under ``torch.autocast`` a plain Linear/ConvNd runs in the autocast dtype
(bf16/fp16) and its gradients reach each input in that input's own dtype. ``Geometry.layer``
and ``DeltaLayerFn`` do the same on any device: the fused weight is formed in the parameters'
dtype, then input, weight and bias are cast once to the autocast dtype (what
``torch.amp.custom_fwd(cast_inputs=...)`` does for one fixed device type), and the backward
returns every gradient in the dtype its input came in (``sparta.devices`` reads the autocast
state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..devices import autocast_dtype, autocast_off
from .lowrank import ROWS, add_projected, layout_of, low_rank_grads, matrix, project, unmatrix

__all__ = ["DeltaLayerFn", "Geometry", "autocast_dtype", "autocast_off"]


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype`` where autocast would cast it (floating, not float64), else ``t``."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


@dataclass(frozen=True)
class Geometry:
    """How a layer reads its input; ``spatial_dims == 0`` means ``nn.Linear``.

    ``padding`` is numeric and zero-valued: other padding modes are applied to the input
    before the kernel, as ``nn.ConvNd`` itself does.
    """

    spatial_dims: int = 0
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    kernel_size: tuple[int, ...] = ()
    groups: int = 1

    @property
    def centre(self) -> tuple:
        return (slice(None), slice(None), *(k // 2 for k in self.kernel_size))

    def with_delta(self, weight: Tensor, delta: Tensor) -> Tensor:
        if all(k == 1 for k in self.kernel_size):  # Linear or 1x1: one pass, no clone
            return weight + delta.view(weight.shape)
        out = weight.clone()
        out[self.centre] += delta
        return out

    def layer(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The plain layer; under autocast it runs in the autocast dtype, as ``F.linear`` and
        ``F.conv*d`` do (``torch.convolution`` itself is not on autocast's list)."""
        low = autocast_dtype(x.device)
        if low is not None:
            x, weight, bias = _cast(x, low), _cast(weight, low), _cast(bias, low)
        if self.spatial_dims == 0:
            return F.linear(x, weight, bias)
        zeros = [0] * self.spatial_dims
        return torch.convolution(
            x, weight, bias, self.stride, self.padding, self.dilation, False, zeros, self.groups
        )

    def input_grad(self, grad: Tensor, x: Tensor, weight: Tensor, mask) -> tuple:
        """``(grad_input, grad_weight)`` of the layer, each computed only if asked for."""
        if self.spatial_dims == 0:
            gx = grad @ weight if mask[0] else None
            gw = _flat(grad).t() @ _flat(x) if mask[1] else None
            return gx, gw
        zeros = [0] * self.spatial_dims
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, self.stride, self.padding, self.dilation,
            False, zeros, self.groups, [mask[0], mask[1], False],
        )  # fmt: skip
        return gx, gw

    def centre_taps(self, x: Tensor, like: Tensor) -> Tensor:
        """What the kernel's centre tap reads for each output position of ``like``:
        ``(N, C, *out_spatial)`` for convs (a strided view where possible), ``(M, C)`` for Linear.
        """
        if self.spatial_dims == 0:
            return _flat(x)
        offsets = self.centre_offsets()
        if any(o < 0 for o in offsets):  # the tap reads zero padding: add just that much
            x = F.pad(x, [v for o in reversed(offsets) for v in (max(-o, 0),) * 2])
            offsets = [max(o, 0) for o in offsets]
        index = [slice(None), slice(None)]
        index += [
            slice(o, o + s * (n - 1) + 1, s)
            for o, s, n in zip(offsets, self.stride, like.shape[2:])
        ]
        return x[tuple(index)]

    def centre_offsets(self) -> list[int]:
        """Where the centre tap reads, relative to the output position times the stride
        (negative: in the zero padding)."""
        return [
            d * (k - 1) // 2 - p for d, k, p in zip(self.dilation, self.kernel_size, self.padding)
        ]

    def centre_index(self, out_shape) -> tuple | None:
        """The index of ``x`` whose entries the centre tap reads for an output of ``out_shape``
        (``None`` for Linear: all of ``x``); only where no tap reads the zero padding."""
        if self.spatial_dims == 0:
            return None
        spans = zip(self.centre_offsets(), self.stride, out_shape[2:])
        return (slice(None), slice(None), *(slice(o, o + s * (n - 1) + 1, s) for o, s, n in spans))

    def out_shape(self, x: Tensor, out_features: int) -> tuple[int, ...]:
        """The layer's output shape for input ``x``."""
        if self.spatial_dims == 0:
            return (*x.shape[:-1], out_features)
        sizes = [
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(
                x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride
            )
        ]
        return (x.shape[0], out_features, *sizes)

    def centre_delta_grad(self, grad: Tensor, taps: Tensor, shape: torch.Size) -> Tensor:
        """Gradient of a delta at the centre tap: the weight gradient of a 1x1 layer over the
        centre-tap input, ``out * in / groups`` multiply-adds per output position."""
        if self.spatial_dims == 0:
            return _flat(grad).t() @ taps
        one = [1] * self.spatial_dims
        kernel = taps.new_empty(*shape, *one)  # only its shape is read
        _, gw, _ = torch.ops.aten.convolution_backward(
            grad, taps, kernel, None, one, [0] * self.spatial_dims, one,
            False, [0] * self.spatial_dims, self.groups, [False, True, False],
        )  # fmt: skip
        return gw.reshape(shape)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


#: Multiply-adds that moving one float through memory costs, for :func:`_branch_form`'s
#: comparison (activations and weights here are far larger than the caches).
_WORD = 16


def _branch_form(geom: Geometry, x: Tensor, weight: Tensor, right: Tensor | None) -> bool:
    """Whether a low-rank delta runs as a branch beside the frozen layer (``y = layer(x; W) +
    L (R x_c)``) rather than fused into its weight (``layer(x; W + L R)``). Both are exact; they
    cost differently. Fused pays for ``L R`` (``r * in * out``) and for writing a new weight
    every step (``k * in * out`` floats, k the kernel's taps); the branch pays ``r * out`` more
    multiply-adds per output position (``R x_c`` is needed for the gradient either way) and
    adds to the output and the input gradient in place. So late layers (large weights, few
    positions) take the branch, early ones the fused weight. Measured on ResNet-50 (r=16, batch
    8, 128 px, 2-core CPU), see benchmarks/train_step.py."""
    if right is None or geom.groups != 1 or any(o < 0 for o in geom.centre_offsets()):
        return False
    out, inp, r = weight.shape[0], weight.shape[1], right.shape[0]
    taps = 1
    for k in geom.kernel_size:
        taps *= k
    shape = geom.out_shape(x, out)  # (M, out) for Linear, whose inputs arrive as matrices
    positions = shape[0]
    for n in shape[2:]:
        positions *= n
    branch = positions * (r * out + 2 * _WORD * (out + inp))
    fused = r * inp * out + _WORD * (2 * taps + 3) * inp * out
    return branch < fused


class DeltaLayerFn(torch.autograd.Function):
    """``y = layer(x; W + centre(left @ right), bias)``; ``right is None`` means delta = left.

    A low-rank delta runs fused into the weight or as a branch (:func:`_branch_form`); either
    way the backward forms no gradient for ``W``. Under autocast the layer runs in the autocast
    dtype like a plain one (see the module docstring); each gradient is returned in the dtype
    of its input.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, left, right, geom: Geometry):
        ctx.dtypes = [None if t is None else t.dtype for t in (x, weight, bias, left, right)]
        ctx.geom = geom
        low = autocast_dtype(x.device)
        with autocast_off(x.device):
            # Under autocast the weight is fused and cast once, as a plain layer's would be.
            ctx.branch = low is None and _branch_form(geom, x, weight, right)
            w_eff = weight
            if not ctx.branch:
                w_eff = geom.with_delta(weight, left if right is None else left @ right)
            if low is not None:
                x, w_eff, bias = _cast(x, low), _cast(w_eff, low), _cast(bias, low)
                left, right = _cast(left, low), _cast(right, low)
            y = geom.layer(x, w_eff, bias)
            y, h = _add_branch(ctx, y, x, left, right) if ctx.branch else (y, None)
            # Saving the fused weight (one weight-sized tensor per layer, far less than the
            # gradient and two optimiser states of full fine-tuning) spares rebuilding it.
            ctx.save_for_backward(x, w_eff, left, right, h)
            return y

    @staticmethod
    def backward(ctx, grad):
        x, w_eff, left, right, h = ctx.saved_tensors
        with autocast_off(grad.device):
            grads = _backward(ctx, grad.to(w_eff.dtype), x, w_eff, left, right, h)
        return (*(None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes)), None)


def _add_branch(ctx, y: Tensor, x: Tensor, left: Tensor, right: Tensor) -> tuple:
    """``(y + L (R x_c), R x_c)`` (the gradient of L needs ``R x_c``); in place where ``y``
    is dense in its layout, as a layer's output is."""
    geom: Geometry = ctx.geom
    ctx.layout = layout_of(y)
    index = geom.centre_index(y.shape)
    taps = x if index is None else x[index]
    h = project(matrix(taps, ctx.layout), right, ctx.layout)
    if ctx.layout == ROWS or y.is_contiguous():  # the matrix is a view of y
        add_projected(matrix(y, ctx.layout), h, left, ctx.layout)
        return y, h
    return y + unmatrix(project(h, left, ctx.layout), y, ctx.layout), h


def _backward(ctx, grad, x, w_eff, left, right, h) -> tuple:
    """``(gx, gw, gb, gl, gr)`` in the dtype the layer ran in (the bias gradient is summed
    in the bias's own dtype, so that a bf16 run accumulates it in float32)."""
    geom: Geometry = ctx.geom
    need_x, need_w, need_b, need_l, need_r, _ = ctx.needs_input_grad
    gx = gw = gb = gl = gr = None
    if need_x or need_w:
        gx, gw = geom.input_grad(grad, x, w_eff, (need_x, need_w))
        if gw is not None:
            gw = gw.reshape(w_eff.shape)
    if need_b:
        channel = 1 if geom.spatial_dims else grad.dim() - 1
        dims = [d for d in range(grad.dim()) if d != channel]
        gb = grad.sum(dim=dims, dtype=ctx.dtypes[2]) if dims else grad.to(ctx.dtypes[2])
    if ctx.branch:
        gl, gr = _branch_grads(ctx, grad, x, gx, left, right, h)
    elif need_l or need_r:
        taps = geom.centre_taps(x, grad)
        if _prefer_thin(left, right):
            layout = layout_of(grad)
            g, xm = matrix(grad, layout), matrix(taps, layout)
            gl, gr, _ = low_rank_grads(g, xm, None, left, right, layout, need_l, need_r)
        else:
            d = geom.centre_delta_grad(grad, taps, torch.Size(w_eff.shape[:2]))
            gl = d if right is None else (d @ right.t() if need_l else None)
            gr = left.t() @ d if need_r and right is not None else None
    return gx, gw, gb, gl, gr


def _prefer_thin(left: Tensor, right: Tensor | None) -> bool:
    """Whether a fused factored delta is differentiated through thin products rather than
    through the centre-tap weight gradient. Measured on ResNet-50 (2-core CPU, r=16, a training
    step as a multiple of full fine-tuning): thin everywhere about 0.81, the centre-tap weight
    gradient everywhere about 0.99, a per-layer choice by multiply-add count about 0.86. So a
    factored delta always takes the thin products (the tests force the other form too)."""
    return right is not None


def _branch_grads(ctx, grad, x, gx, left, right, h) -> tuple:
    """Gradients of L and R through the branch, and its part of the input gradient (added
    into ``gx`` in place, at the positions the centre tap reads)."""
    geom: Geometry = ctx.geom
    need_x, _, _, need_l, need_r, _ = ctx.needs_input_grad
    index = geom.centre_index(grad.shape)
    taps = x if index is None else x[index]
    g, xm = matrix(grad, ctx.layout), matrix(taps, ctx.layout)
    gl, gr, k = low_rank_grads(g, xm, h, left, right, ctx.layout, need_l, need_r, need_x)
    if need_x:
        part = unmatrix(project(k, right.t(), ctx.layout), taps, ctx.layout)
        (gx if index is None else gx[index]).add_(part)
    return gl, gr
