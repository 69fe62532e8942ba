"""Layer-wise relevance propagation (Yeom et al. 2021) with zennit, for the ``lrp`` criterion.

zennit needs plain torch layers, so relevance is computed on ``sparta.fuse(model)`` (same
names, same function), with BatchNorm merged where a canonizer applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..utils import call
from ..wrapping import fuse


def _logits(outputs):
    return getattr(outputs, "logits", outputs)


class _SplitAttention(nn.Module):
    """LRP copy only: ``mha`` with an identity output projection, then its real ``out_proj``
    as a module, so that a rule and a hook see the heads' contexts (exact: ``a I^T + 0 = a``)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.out_proj, w = mha.out_proj, mha.out_proj.weight
        identity = nn.Linear(w.shape[1], w.shape[0], mha.out_proj.bias is not None, w.device)
        with torch.no_grad():
            identity.weight.copy_(torch.eye(w.shape[0]))
            if identity.bias is not None:
                identity.bias.zero_()
        mha.out_proj, self.attention = identity.to(w.dtype).requires_grad_(False), mha

    def forward(self, *args, **kwargs):
        context, weights = self.attention(*args, **kwargs)
        return self.out_proj(context), weights


def lrp_copy(model: nn.Module, inputs) -> nn.Module:
    """Plain layers (as zennit needs) with the model's names and function, in eval mode."""
    plain = fuse(model).eval()
    for p in plain.parameters():
        p.requires_grad_(True)  # zennit applies a layer's rule only if its input needs grad
    for name, m in list(plain.named_modules()):
        if isinstance(m, nn.MultiheadAttention) and name:
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, _SplitAttention(m))
    _canonize(plain, inputs)
    return plain


def _canonize(plain: nn.Module, inputs) -> None:
    """Merge BatchNorms into the layers before them (zennit canonizers; torchvision ResNets also
    get explicit residual sums). ``SequentialMergeBatchNorm`` trusts module registration order,
    so a merge that changes the function is undone: such models run without a canonizer."""
    from torchvision.models import ResNet
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    canonizer = ResNetCanonizer() if isinstance(plain, ResNet) else SequentialMergeBatchNorm()
    with torch.no_grad():
        before = _logits(call(plain, inputs))
        applied = canonizer.apply(plain)
        after = _logits(call(plain, inputs)) if applied else before
    if not isinstance(before, Tensor) or not bool(torch.isfinite(before).all()):
        for instance in reversed(applied):  # nothing to compare: the criterion reports NaN/inf
            instance.remove()
        return
    if before.numel():
        # Merging is exact up to rounding (measured 1.3e-4 of the largest logit on a random
        # ResNet-50); a merge in the wrong order changes outputs by orders of magnitude more.
        atol = 1e-3 * float(before.abs().max()) + 1e-6
        if not torch.allclose(after, before, rtol=1e-3, atol=atol):
            for instance in reversed(applied):
                instance.remove()


def _positive_zplus(stabilise):
    """The z+ rule in its deep-Taylor form (Montavon et al. 2017): only positive inputs through
    positive weights carry relevance, ``R_i = x_i^+ sum_j w_ij^+ R_j / z_j^+``. zennit's
    ``ZPlus`` (alpha=1, beta=0 over inputs of either sign) evaluates the layer twice; after a
    ReLU the inputs are non-negative and both agree, at half the cost (the issue's budget for
    scoring is 2x a forward and backward pass)."""
    from zennit.core import BasicHook
    from zennit.rules import ClampMod

    return BasicHook(
        input_modifiers=[lambda x: x.clamp(min=0)],
        param_modifiers=[ClampMod(min=0.0)],
        output_modifiers=[lambda out: out],
        gradient_mapper=lambda out_grad, outputs: [out_grad / stabilise(outputs[0])],
        reducer=lambda inputs, gradients: inputs[0] * gradients[0],
    )


def composite(epsilon: float):
    """zennit's ``EpsilonPlus`` (z+ for convolutions, epsilon for linear layers), except:

    * epsilon is relative, ``z + epsilon * std(z) * sign(z)`` (Montavon et al. 2019 suggest
      0.25 std): with a fixed tiny epsilon relevance grows by orders of magnitude per block in
      deep transformers (inf/NaN before ViT-B's first layers);
    * MultiheadAttention, which zennit counts as an activation (relevance passed over the
      block), gets no rule: relevance reaches the heads' contexts and flows through attention
      as a gradient (LRP rules for attention itself are out of scope);
    * LayerNorm passes relevance through (its scaling taken as constant, as transformer LRP
      does). zennit already passes BatchNorm; its Pass rule fails on GroupNorm, left as is;
    * convolutions take the single-pass z+ of :func:`_positive_zplus`.
    """
    from zennit.composites import EpsilonPlus
    from zennit.rules import Pass

    def stabilise(z: Tensor) -> Tensor:
        eps = epsilon * float(z.detach().std(correction=0)) + 1e-12
        return z + eps * (2 * (z >= 0).to(z.dtype) - 1)

    norms = (nn.LayerNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (nn.LayerNorm,)
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    rules = [(nn.MultiheadAttention, None), (norms, Pass()), (convs, _positive_zplus(stabilise))]
    return EpsilonPlus(epsilon=stabilise, layer_map=rules)


def true_class_start(logits, targets) -> Tensor:
    """Relevance starts at the true class as ``one_hot(y) * |z_y|``: the standard ``one_hot(y)
    * z`` when ``z_y > 0`` (the usual case once trained); ``| |`` keeps a sample with a negative
    true-class logit from flipping the sign of all its relevances and cancelling others'."""
    ok = isinstance(logits, Tensor) and isinstance(targets, Tensor) and logits.dim() >= 1
    if not ok or targets.is_floating_point() or targets.shape != logits.shape[:-1]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        want = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ConfigError(
            "lrp needs class scores (..., classes) and integer class targets (...); "
            f"got scores {got} and targets {want}"
        )
    onehot = F.one_hot(targets.long(), logits.shape[-1]).to(logits.dtype)
    return onehot * logits.detach().abs()
