"""LRP rules as autograd functions of our own: one modified backward pass gives the relevances.

Under :class:`RelevanceMode` (a ``TorchFunctionMode``) routes each torch call that has a rule
through a custom autograd function. Its forward is the call itself (the model computes exactly
what it computes without rules); its backward is the rule, so the gradient that reaches a tensor
is that tensor's relevance. Nothing is hooked on modules (except activation modules, see
below), so functional code, residual sums written as ``out += identity``, concatenations and
timm's own layers are all seen. The rules (Bach et al. 2015; Montavon et al. 2019; for pruning,
Yeom et al. 2021, "Pruning by explaining"):

* convolutions: alpha1-beta0 (z+): ``R_i = sum_j (x_i^+ w_ij^+ + x_i^- w_ij^-) R_j / z_j``
  with ``z_j`` the sum of those positive contributions (and the positive bias); a single pass
  where the input is non-negative (after a ReLU), as zennit's ``ZPlus``;
* linear layers: epsilon, ``R_i = x_i sum_j w_ij R_j / (z_j + eps sign z_j)``;
* a BatchNorm reading a convolution's or linear layer's output is folded into that layer's rule
  (the rule sees ``s W`` and ``s (b - mu) + beta``, as a canonizer merging them would); every
  BatchNorm, LayerNorm, GroupNorm and RMSNorm passes relevance on unchanged;
* elementwise activations (ReLU included: a pass-through BatchNorm above it can hand relevance
  to its zero outputs) and scaling by a constant pass relevance on unchanged; max pooling needs
  no rule (its gradient is Yeom et al.'s winner-takes-all);
* the residual sum of two tracked tensors (Yeom et al.): ``R_a = a R / (a + b)``, likewise
  ``R_b``; average pooling (also adaptive, and ``mean`` over all positions): ``R_i = x_i R_j /
  sum_i x_i`` over the window (zennit's ``Norm`` rule);
* concatenation, slicing and reshapes route relevance as their gradient does; everything else
  (attention products, softmax, gates) passes the gradient.

:func:`sparta.pruning.lrp.relevance_rules` runs a model under these rules.

Epsilons: relative, ``eps * std(z)`` (``RelevanceMode(epsilon)``), for convolutions
and linear layers; a fixed 1e-6 for sums and pooling (zennit's default for its ``Norm`` rule).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.overrides import TorchFunctionMode

_MARK = "_sparta_lrp_layer"  # attribute of a rule layer's output: its _Call, for a BatchNorm
_LOCAL = threading.local()  # ``quiet``: inside a rule's backward, calls pass through the mode
_FIXED = 1e-6


def _shift(z: Tensor, eps) -> Tensor:
    """``z + eps sign(z)`` with sign(0) = +1, as zennit's stabilisers (one pass)."""
    return torch.where(z >= 0, z + eps, z - eps)


def _relative(z: Tensor, epsilon: float) -> Tensor:
    """``z + eps sign(z)`` with ``eps = epsilon * std(z)``: with a fixed tiny epsilon,
    relevance grows by orders of magnitude per block in deep transformers."""
    return _shift(z, epsilon * z.detach().std(correction=0) + 1e-12)  # 0-d: no host sync


def _fixed(z: Tensor) -> Tensor:
    return _shift(z, _FIXED)


@contextmanager
def _quiet():
    before = getattr(_LOCAL, "quiet", False)
    _LOCAL.quiet = True
    try:
        with torch.enable_grad():
            yield
    finally:
        _LOCAL.quiet = before


# -- convolutions and linear layers ---------------------------------------------------------------
@dataclass(eq=False)
class _Call:
    """One call of a layer function: how to call it again with other tensors, its rule, and the
    BatchNorm folded into it (``scale``, ``shift`` per output channel), if any."""

    func: Callable
    rest: tuple
    kwargs: dict
    conv: bool
    epsilon: float
    fold: tuple[Tensor, Tensor] | None = None

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self.func(x, weight, bias, *self.rest, **self.kwargs)

    def folded(self, weight: Tensor, bias: Tensor | None):
        if self.fold is None:
            return weight, bias
        scale, shift = self.fold
        weight = weight * scale.view(-1, *[1] * (weight.dim() - 1)).to(weight.dtype)
        bias = shift if bias is None else bias * scale + shift
        return weight, bias.to(weight.dtype)


class _LayerRule(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, call: _Call):
        ctx.call = call
        ctx.save_for_backward(x, weight, bias)
        return call(x, weight, bias)

    @staticmethod
    def backward(ctx, relevance):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        x, weight, bias = ctx.saved_tensors
        call = ctx.call
        with _quiet():
            weight, bias = call.folded(weight, bias)
            rule = _zplus if call.conv else _epsilon
            return rule(call, x.detach(), weight, bias, relevance), None, None, None


def _zplus(call: _Call, x: Tensor, weight: Tensor, bias, relevance: Tensor) -> Tensor:
    """alpha1-beta0: positive inputs through positive weights (with the positive bias), negative
    inputs through negative weights; the second pass only where some input is negative."""
    negative = x.numel() > 0 and bool(x.min() < 0)
    xs = [(x.clamp(min=0) if negative else x).requires_grad_()]
    z = call(xs[0], weight.clamp(min=0), None if bias is None else bias.clamp(min=0))
    if negative:
        xs.append(x.clamp(max=0).requires_grad_())
        z = z + call(xs[1], weight.clamp(max=0), None)
    # every contribution to z is positive, so z >= 0 and its stabiliser is ``z + eps``
    z_d = z.detach()
    eps = call.epsilon * z_d.std(correction=0) + 1e-12
    grads = torch.autograd.grad(z, xs, relevance / (z_d + eps))
    out = grads[0].mul_(xs[0].detach())
    return out.addcmul_(xs[1].detach(), grads[1]) if negative else out


def _epsilon(call: _Call, x: Tensor, weight: Tensor, bias, relevance: Tensor) -> Tensor:
    x = x.requires_grad_()
    z = call(x, weight, bias)
    (grad,) = torch.autograd.grad(z, x, relevance / _relative(z.detach(), call.epsilon))
    return grad.mul_(x.detach())


def _layer(mode: RelevanceMode, func, args, kwargs, conv: bool):
    x, weight, bias, rest, kwargs = _layer_args(args, kwargs)
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and x.requires_grad):
        return func(*args, **kwargs)
    call = _Call(func, rest, kwargs, conv, mode.epsilon)
    out = _LayerRule.apply(x, weight, bias, call)
    # a BatchNorm reading this output folds into the rule: only for one output channel per
    # weight row on dim 1 (convolutions) or the last dim of a 2-D output (linear layers)
    transposed = func in _TRANSPOSED
    if not transposed and (conv or out.dim() == 2):
        setattr(out, _MARK, call)
    return out


def _layer_args(args, kwargs):
    names = ("input", "weight", "bias")
    values = list(args[:3]) + [None] * (3 - min(len(args), 3))
    kwargs = dict(kwargs)
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs.pop(name)
    return values[0], values[1], values[2], tuple(args[3:]), kwargs


# -- norms and activations: relevance passes on ---------------------------------------------------
class _Pass(Function):
    @staticmethod
    def forward(ctx, x, fn):
        out = fn(x)
        if out is x:  # an in-place activation
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, relevance):
        return relevance, None


def _pass(mode: RelevanceMode, func, args, kwargs):
    x = args[0] if args else None
    if not (isinstance(x, Tensor) and x.requires_grad and x.is_floating_point()):
        return func(*args, **kwargs)
    if x.is_leaf:  # an in-place call on a leaf that needs a gradient is refused: work on a copy
        x = x.clone()

    def fn(t):
        return func(t, *args[1:], **kwargs)

    return _Pass.apply(x, fn)


def _module_pass(mode: RelevanceMode, func, args, kwargs):
    """sigmoid and tanh pass relevance when an activation module calls them (zennit's rule for
    ``nn.Sigmoid``, ``nn.Tanh``); elsewhere (gates, GELU approximations) the gradient."""
    if mode.depth:
        return _pass(mode, func, args, kwargs)
    return func(*args, **kwargs)


def _batch_norm(mode: RelevanceMode, func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "m", "eps")
    v = dict(zip(names, args), **kwargs)
    x = v.get("input")
    call = getattr(x, _MARK, None)
    stats = v.get("running_mean") is not None and v.get("running_var") is not None
    if call is not None and call.fold is None and stats and not v.get("training", False):
        mean, var = v["running_mean"], v["running_var"]
        scale = torch.rsqrt(var + v.get("eps", 1e-5))
        if v.get("weight") is not None:
            scale = scale * v["weight"]
        shift = -mean * scale
        if v.get("bias") is not None:
            shift = shift + v["bias"]
        call.fold = (scale.detach(), shift.detach())
    return _pass(mode, func, args, kwargs)


def _scale(mode: RelevanceMode, func, args, kwargs):
    """``x * c`` or ``x / c`` by a constant (untracked tensor or number) of the same or a
    broadcast-in shape: a diagonal linear map without bias, whose LRP rule passes relevance."""
    a, b = (args + (None, None))[:2]
    tracked = [t for t in (a, b) if isinstance(t, Tensor) and t.requires_grad]
    ok = len(args) == 2 and not kwargs and len(tracked) == 1
    if func in _DIVISIONS:
        ok = ok and tracked[0] is a
    x = tracked[0] if ok else None
    if x is None or not x.is_floating_point():
        return func(*args, **kwargs)
    other = b if x is a else a
    if isinstance(other, Tensor) and torch.broadcast_shapes(x.shape, other.shape) != x.shape:
        return func(*args, **kwargs)

    def fn(t):
        return func(t, other) if x is a else func(other, t)

    return _Pass.apply(x, fn)


# -- residual sums and average pooling: proportional (zennit's Norm rule) -------------------------
class _SumRule(Function):
    @staticmethod
    def forward(ctx, a, b, func):
        before = a.clone() if func in _IN_PLACE else a
        out = func(a, b)
        if out is a:
            ctx.mark_dirty(a)
        ctx.save_for_backward(before, b)
        return out

    @staticmethod
    def backward(ctx, relevance):
        a, b = ctx.saved_tensors
        s = relevance / _fixed(a + b)
        return a * s, b * s, None


def _sum(mode: RelevanceMode, func, args, kwargs):
    a, b = (args + (None, None))[:2]
    ok = len(args) == 2 and not kwargs and isinstance(a, Tensor) and isinstance(b, Tensor)
    ok = ok and a.requires_grad and b.requires_grad and a.shape == b.shape
    if not ok or a.dtype != b.dtype or not a.is_floating_point():
        return func(*args, **kwargs)
    if func in _IN_PLACE and a.is_leaf:
        return func(*args, **kwargs)
    return _SumRule.apply(a, b, func)


class _PoolRule(Function):
    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        ctx.save_for_backward(x)
        return fn(x)

    @staticmethod
    def backward(ctx, relevance):
        (x,) = ctx.saved_tensors
        with _quiet():
            x = x.detach().requires_grad_()
            z = ctx.fn(x)
            (grad,) = torch.autograd.grad(z, x, relevance / _fixed(z.detach()))
            return x.detach() * grad, None


def _pool(mode: RelevanceMode, func, args, kwargs):
    x = args[0] if args else None
    if not (isinstance(x, Tensor) and x.requires_grad and x.is_floating_point()):
        return func(*args, **kwargs)
    if func in _MEANS and not _over_positions(x, args, kwargs):
        return func(*args, **kwargs)

    def fn(t):
        return func(t, *args[1:], **kwargs)

    return _PoolRule.apply(x, fn)


def _over_positions(x: Tensor, args, kwargs) -> bool:
    """``mean`` over every dim after (batch, channels): a global average pooling."""
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    if dims is None or x.dim() < 3 or set(kwargs) - {"dim", "keepdim"}:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return sorted(d % x.dim() for d in dims) == list(range(2, x.dim()))


# -- bookkeeping -----------------------------------------------------------------------------------
def _embedding(mode: RelevanceMode, func, args, kwargs):
    """Embeddings start tracked, like floating inputs: a residual sum downstream then sees
    both of its operands (else the untracked one would get no share)."""
    out = func(*args, **kwargs)
    if torch.is_grad_enabled() and out.is_floating_point() and not out.requires_grad:
        out.requires_grad_()
    return out


def _keep_mark(mode: RelevanceMode, func, args, kwargs):
    """clone/detach (the probes' copies) keep a layer output's mark for its BatchNorm."""
    out = func(*args, **kwargs)
    call = getattr(args[0], _MARK, None) if args else None
    if call is not None and isinstance(out, Tensor):
        setattr(out, _MARK, call)
    return out


_T = torch.Tensor
_CONVS = (torch.conv1d, torch.conv2d, torch.conv3d)
_TRANSPOSED = (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d)
_IN_PLACE = (_T.add_, _T.__iadd__)
_DIVISIONS = (_T.div, _T.__truediv__, torch.div)
_MEANS = (_T.mean, torch.mean)
_ACTIVATIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, _T.relu, _T.relu_, F.hardtanh, F.hardtanh_,
    F.relu6, F.elu, F.elu_, F.selu, F.celu, F.leaky_relu, F.leaky_relu_, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.softplus, F.prelu,
    F.rrelu, F.threshold, F.logsigmoid, F.softsign, F.tanhshrink, F.softshrink, F.hardshrink,
)  # fmt: skip
_NORMS = (
    F.layer_norm,
    F.group_norm,
    F.instance_norm,
    *(getattr(F, n) for n in ("rms_norm",) if hasattr(F, n)),
)
_AMBIGUOUS = (torch.sigmoid, _T.sigmoid, torch.tanh, _T.tanh, F.sigmoid, F.tanh)
#: modules whose sigmoid/tanh call passes relevance (elsewhere those pass the gradient)
AMBIGUOUS_MODULES = (nn.Sigmoid, nn.Tanh)
_POOLS = (
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
)  # fmt: skip

_RULES: dict[Callable, Callable] = {
    **{f: lambda m, f_, a, k: _layer(m, f_, a, k, True) for f in (*_CONVS, *_TRANSPOSED)},
    F.linear: lambda m, f_, a, k: _layer(m, f_, a, k, False),
    F.batch_norm: _batch_norm,
    **dict.fromkeys((*_ACTIVATIONS, *_NORMS), _pass),
    **dict.fromkeys(_AMBIGUOUS, _module_pass),
    **dict.fromkeys((_T.mul, _T.__mul__, _T.__rmul__, torch.mul, *_DIVISIONS), _scale),
    **dict.fromkeys((torch.add, _T.add, _T.__add__, *_IN_PLACE), _sum),
    **dict.fromkeys((*_POOLS, *_MEANS), _pool),
    F.embedding: _embedding,
    **dict.fromkeys((_T.clone, torch.clone, _T.detach, torch.detach), _keep_mark),
}


class RelevanceMode(TorchFunctionMode):
    """Routes the calls that have an LRP rule through it (see the module's docstring)."""

    def __init__(self, epsilon: float):
        super().__init__()
        self.epsilon, self.depth = float(epsilon), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is None or getattr(_LOCAL, "quiet", False) or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        return rule(self, func, tuple(args), kwargs)
