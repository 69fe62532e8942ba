"""Which torch layers an :class:`AdaptedLayer` reproduces exactly, and how.

An adapted layer never calls its base layer's ``forward``: it runs the plain torch operation
(``F.linear`` / ``torch.convolution``) with ``(W + delta) * M``. That is right for
``nn.Linear`` and ``nn.ConvNd`` themselves, and wrong for any subclass whose ``forward`` does
something else (timm's ``Conv2dSame`` pads its input itself, ``StdConv2d`` standardises its
weight): adapting such a layer as if it were its torch parent changes the model silently.

So each layer type gets a :class:`LayerForm`, the recipe sparta follows:

    y = layer(pad(x), standardise(W_task))

* torch's own classes, and subclasses that override none of the methods the forward runs
  through, have the plain form (no ``pad``, no ``standardise``);
* subclasses registered here (:func:`register_form`) have their own recipe, checked against
  the layer's real forward on a probe input when the model is wrapped;
* any other subclass whose ``forward`` (or ``_conv_forward``, ``__call__``) differs from its
  torch parent's is not adapted: :func:`form_reason` says why, and ``wrap`` reports it.

Weight standardisation and the delta: the task weight is ``S((W + delta) * M) * M``, where
``S`` is the layer's standardisation. The delta goes inside ``S`` because it stands for a change
of the layer's stored weight, which is what fine-tuning such a layer changes (and what the layer
standardises). ``M`` goes inside too, so that a pruned input's weights and deltas take no part
in the statistics (no gradient reaches a pruned entry: pruned channels cannot regrow), and
outside, so that a pruned entry is exactly zero (``S`` shifts zeros by the row mean) and the
compact model, which stores ``S(...)`` in a plain layer and slices it, computes the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

#: Methods through which a torch Linear/ConvNd computes its output; a subclass overriding one of
#: them computes something sparta cannot know.
_FORWARD_METHODS = ("forward", "_conv_forward", "__call__", "_call_impl")


@dataclass(frozen=True)
class LayerForm:
    """How sparta computes a layer type's output.

    Args:
        name: the layer type, for messages.
        pad: ``pad(layer, x)``, the layer's own transform of its input, applied before the kernel.
        standardise: ``standardise(layer, weight)``, the layer's own transform of its weight.
        refuse: ``refuse(layer)``, why this particular instance is not reproduced, or ``None``.
        plain: ``plain(layer)``, the class of the fused layer: a type that computes the layer's
            function from a stored weight as is. Defaults to the layer's own class when the form
            has no ``standardise`` (its own forward then does the rest), else the torch parent.
    """

    name: str
    pad: Callable[[nn.Module, Tensor], Tensor] | None = None
    standardise: Callable[[nn.Module, Tensor], Tensor] | None = None
    refuse: Callable[[nn.Module], str | None] | None = None
    plain: Callable[[nn.Module], type] | None = None

    @property
    def is_plain(self) -> bool:
        return self.pad is None and self.standardise is None

    def plain_class(self, layer: nn.Module) -> type:
        if self.plain is not None:
            return self.plain(layer)
        return type(layer) if self.standardise is None else torch_parent(type(layer))


#: The form of torch's own layers.
PLAIN = LayerForm("torch")

_FORMS: dict[str, LayerForm] = {}


def register_form(*qualnames: str, **recipe) -> LayerForm:
    """Register the recipe (see :class:`LayerForm`) for the classes named ``module.QualName``.

    Classes are matched by name, so registering one never imports its library; the recipe is
    checked against the layer's real forward whenever a model is wrapped.
    """
    form = LayerForm(qualnames[0].rpartition(".")[2], **recipe)
    for q in qualnames:
        _FORMS[q] = form
    return form


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def torch_parent(cls: type) -> type:
    """The nearest class in ``cls``'s MRO defined by torch itself (``nn.Conv2d``, ...)."""
    return next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn."))


def form_of(layer: nn.Module) -> LayerForm:
    """The registered form of ``layer``'s class, else :data:`PLAIN` (see :func:`form_reason`)."""
    return _FORMS.get(_qualname(type(layer)), PLAIN)


def form_reason(layer: nn.Module) -> str | None:
    """Why sparta cannot reproduce ``layer``'s forward exactly, or ``None`` when it can."""
    cls = type(layer)
    if parametrize.is_parametrized(layer):
        return "its weight is computed by a torch parametrization, not stored"
    if layer._forward_pre_hooks or layer._forward_hooks:
        return (
            "it has forward hooks (e.g. torch.nn.utils.weight_norm or prune), which would not run"
        )
    weight = layer._parameters.get("weight")
    if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.UninitializedParameter):
        return "its weight is not an initialised nn.Parameter"
    if "forward" in layer.__dict__:
        return "its forward was replaced on the instance"
    form = _FORMS.get(_qualname(cls))
    if form is not None:
        return form.refuse(layer) if form.refuse is not None else None
    return _override_reason(cls)


def _override_reason(cls: type) -> str | None:
    parent = torch_parent(cls)
    for method in _FORWARD_METHODS:
        if getattr(cls, method, None) is not getattr(parent, method, None):
            return (
                f"{cls.__qualname__} overrides {method} of torch's {parent.__name__}, and sparta "
                "does not know what it computes, so it is left frozen (register its recipe with "
                "sparta.adapters.forms.register_form to adapt it)"
            )
    return None


def mask_reason(layer: nn.Module) -> str | None:
    """Why a channel mask on this *plain* layer's stored weight (fine-pruning, or a layer
    ``wrap`` skipped) would not be pruning that the compact model reproduces by slicing, or
    ``None``: a forward sparta does not know, or one that standardises the weight (a masked
    input column still counts in each row's statistics, a sliced one does not)."""
    form = _FORMS.get(_qualname(type(layer)))
    if form is None:
        return _override_reason(type(layer))
    if form.standardise is not None:
        return f"{form.name} standardises its stored weight, so masking it is not pruning"
    return None


# -- recipes -----------------------------------------------------------------------------------
def same_pad(layer: nn.Module, x: Tensor) -> Tensor:
    """TensorFlow's "SAME" padding for this input size: the output has ceil(size / stride)
    positions; the odd pixel of an uneven total goes to the end (right / bottom)."""
    spatial = x.shape[-len(layer.kernel_size) :]
    pads: list[int] = []
    for size, k, s, d in reversed(
        list(zip(spatial, layer.kernel_size, layer.stride, layer.dilation))
    ):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


def _standardised(layer: nn.Module, weight: Tensor, gain: Tensor | None) -> Tensor:
    """Each output row of ``weight`` to mean 0 and variance 1 (biased, with ``layer.eps``),
    times ``gain`` per row: the same batch-norm call the layer itself makes."""
    rows = weight.reshape(1, weight.shape[0], -1)
    out = F.batch_norm(rows, None, None, weight=gain, training=True, momentum=0.0, eps=layer.eps)
    return out.reshape_as(weight)


def _weight_std(layer: nn.Module, weight: Tensor) -> Tensor:
    return _standardised(layer, weight, None)


def _scaled_weight_std(layer: nn.Module, weight: Tensor) -> Tensor:
    return _standardised(layer, weight, (layer.gain * layer.scale).view(-1))


def _pad_if_dynamic(layer: nn.Module, x: Tensor) -> Tensor:
    return same_pad(layer, x) if layer.same_pad else x


def _zeros_padding_only(layer: nn.Module) -> str | None:
    # These forwards call F.conv2d with the stored padding and never read padding_mode.
    if layer.padding_mode != "zeros":
        return f"its forward ignores padding_mode={layer.padding_mode!r}"
    return None


def _conv2d_same_reason(layer: nn.Module) -> str | None:
    # Its forward pads dynamically and convolves with padding 0, whatever is stored.
    if any(layer.padding):
        return f"its stored padding {tuple(layer.padding)} would be ignored by its forward"
    return _zeros_padding_only(layer)


def _plain_same_conv(layer: nn.Module) -> type:
    """Fused class of a standardising conv: ``Conv2dSame`` if it pads dynamically."""
    if getattr(layer, "same_pad", False):
        from timm.layers import Conv2dSame  # the layer is timm's, so timm is there

        return Conv2dSame
    return torch_parent(type(layer))


_TIMM = "timm.layers"
# timm's own Linear only casts under TorchScript; eager, it is nn.Linear's forward.
register_form(f"{_TIMM}.linear.Linear", "timm.models.layers.linear.Linear")
register_form(
    f"{_TIMM}.conv2d_same.Conv2dSame",
    "timm.models.layers.conv2d_same.Conv2dSame",
    pad=same_pad,
    refuse=_conv2d_same_reason,
)
register_form(
    f"{_TIMM}.std_conv.StdConv2d",
    "timm.models.layers.std_conv.StdConv2d",
    standardise=_weight_std,
    refuse=_zeros_padding_only,
)
register_form(
    f"{_TIMM}.std_conv.ScaledStdConv2d",
    "timm.models.layers.std_conv.ScaledStdConv2d",
    standardise=_scaled_weight_std,
    refuse=_zeros_padding_only,
)
register_form(
    f"{_TIMM}.std_conv.StdConv2dSame",
    "timm.models.layers.std_conv.StdConv2dSame",
    pad=_pad_if_dynamic,
    standardise=_weight_std,
    refuse=_zeros_padding_only,
    plain=_plain_same_conv,
)
register_form(
    f"{_TIMM}.std_conv.ScaledStdConv2dSame",
    "timm.models.layers.std_conv.ScaledStdConv2dSame",
    pad=_pad_if_dynamic,
    standardise=_scaled_weight_std,
    refuse=_zeros_padding_only,
    plain=_plain_same_conv,
)
