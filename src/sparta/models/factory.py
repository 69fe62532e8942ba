"""Models by name: torchvision classifiers, ``timm:<name>``, ``hf:<id or folder>`` (Hugging Face
sequence classifiers) and the built-in ``digits_cnn``."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ..errors import ConfigError, UnknownNameError
from .checkpoint import load_strict, read_state_dict
from .digits import digits_cnn
from .hf import HF_PREFIX, hf_model

#: Built-in models (name -> constructor taking ``num_classes``) and their default class count.
BUILTIN = {"digits_cnn": (digits_cnn, 10)}
TIMM_PREFIX = "timm:"
#: Auxiliary classifiers of torchvision's GoogLeNet and Inception v3, resized with the main head.
AUX_HEADS = ("aux1.fc2", "aux2.fc2", "AuxLogits.fc")


def list_models() -> list[str]:
    """Every name :func:`create` accepts, except ``timm:<name>`` (see ``timm.list_models()``)
    and ``hf:<hub id or folder>``: all torchvision classification models and the built-in
    ``digits_cnn``."""
    return sorted([*_torchvision_names(), *BUILTIN])


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def create(
    name: str,
    num_classes: int | None = None,
    weights: str | None = None,
    checkpoint: str | Path | None = None,
    cifar_stem: bool = False,
) -> nn.Module:
    """Build the classification model ``name``.

    Args:
        name: a torchvision classification model (``resnet50``, ``vit_b_16``, ...; see
            :func:`list_models`), ``timm:<name>`` (needs ``pip install timm``; a pretrained tag
            goes in the name, e.g. ``timm:resnet50.a1_in1k``), ``hf:<hub id or local folder>``
            (a Hugging Face ``AutoModelForSequenceClassification`` with a fresh head of
            ``num_classes`` labels on the pretrained encoder; needs ``pip install
            'sparta[hf]'``; honours ``HF_HUB_OFFLINE``) or ``digits_cnn`` (a small CNN for
            1x8x8 / 1x16x16 grayscale digits, 10 classes unless ``num_classes`` says otherwise).
        num_classes: replace the classifier head with a freshly initialised ``nn.Linear`` of
            this many outputs (same input features and bias setting); ``None`` keeps the head.
            The head is the last ``nn.Linear`` registered in the model (``fc`` of ResNets,
            ``classifier[-1]`` of VGG/MobileNet/EfficientNet, ``heads.head`` of ViT, ...), or the
            last ``nn.Conv2d`` of ``classifier`` for SqueezeNet; timm models use their own
            ``reset_classifier``. GoogLeNet / Inception v3 auxiliary heads are resized too.
            Without ``weights`` or ``checkpoint``, torchvision models are simply constructed
            with ``num_classes``.
        weights: ``None`` (random initialisation), ``"DEFAULT"`` or the name of a member of
            the model's torchvision weight enum (``"IMAGENET1K_V2"`` or
            ``"ResNet50_Weights.IMAGENET1K_V2"``). torchvision reads the file from
            ``$TORCH_HOME/hub/checkpoints/<basename of the weight's url>`` and downloads it there
            first if it is missing. For ``timm:`` models only ``"DEFAULT"`` (``pretrained=True``).
        checkpoint: a local state dict (``.safetensors``, or ``.pt``/``.pth``/... read with
            ``torch.load(weights_only=True)``; a dict nesting it under ``"state_dict"`` or
            ``"model"`` is fine) loaded strictly into the model. If its head has a different
            number of outputs than the model's, the head is first resized to fit the
            checkpoint; ``num_classes`` then replaces the loaded head only if it differs from
            the checkpoint's. With ``cifar_stem``, a checkpoint whose ``conv1`` is 3x3 is
            loaded after the stem change (a saved CIFAR model), a 7x7 one before (the stem is
            then pooled from it). Not combinable with ``weights``.
        cifar_stem: the CIFAR variant of a ResNet (any model with a 7x7 ``conv1`` and a
            ``maxpool``): see :func:`apply_cifar_stem`.

    Raises:
        UnknownNameError: ``name`` is not a known model.
        ConfigError: bad ``weights``, ``num_classes``, checkpoint, missing timm, ``cifar_stem``
            on a model without a ResNet stem, or weights that cannot be fetched.
    """
    if not isinstance(name, str):
        raise UnknownNameError("model", name, list_models())
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if weights is not None and checkpoint is not None:
        raise ConfigError("give either weights or checkpoint, not both")

    state = read_state_dict(checkpoint) if checkpoint is not None else None
    if name.startswith(TIMM_PREFIX):
        model = _timm_model(name[len(TIMM_PREFIX) :], weights)
    elif name.startswith(HF_PREFIX):
        model = hf_model(name, num_classes if state is None else None, weights)
    elif name in BUILTIN:
        if weights is not None:
            raise ConfigError(
                f"{name!r} has no published weights; train it and pass checkpoint=... instead"
            )
        build, default_classes = BUILTIN[name]
        model = build(num_classes if state is None and num_classes else default_classes)
    elif name in _torchvision_names():
        model = _torchvision_model(name, weights, num_classes if state is None else None)
    else:
        raise UnknownNameError("model", name, list_models())

    if state is not None:
        stem_first = cifar_stem and _is_small_stem(state.get("conv1.weight"))
        if stem_first:
            apply_cifar_stem(model)
        head = _head_name(model)
        saved_head = state.get(f"{head}.weight") if head is not None else None
        if saved_head is not None and saved_head.shape[0] != _out_features(model, head):
            replace_head(model, saved_head.shape[0])
        load_strict(model, state, str(checkpoint), f"model {name!r}")
        if cifar_stem and not stem_first:
            apply_cifar_stem(model)
    elif cifar_stem:
        apply_cifar_stem(model)

    head = _head_name(model)
    if num_classes is not None and (head is None or _out_features(model, head) != num_classes):
        replace_head(model, num_classes)
    return model


# -- construction ----------------------------------------------------------------------------
def _torchvision_model(name: str, weights: str | None, num_classes: int | None) -> nn.Module:
    if weights is None:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(name, **kwargs)
    weight = resolve_weights(name, weights)
    try:
        return torchvision.models.get_model(name, weights=weight)
    except OSError as error:  # urllib's URLError, HTTPError and socket errors are OSErrors
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weight.url)
        raise ConfigError(
            f"cannot load weights {weight} for {name!r}: {error}; download {weight.url} "
            f"to {target} (or set TORCH_HOME) and try again" + _cached_instead(weight)
        ) from None


def _cached_instead(weight) -> str:
    """A hint naming the other weights of ``weight``'s enum whose files are already in torch's
    hub cache ("" if none): torchvision's DEFAULT is often a file that is not there offline."""
    cached = Path(torch.hub.get_dir()) / "checkpoints"
    others: dict[str, str] = {}  # url -> first member name (DEFAULT is an alias of one)
    for member, value in type(weight).__members__.items():
        if value.url != weight.url and (cached / os.path.basename(value.url)).is_file():
            others.setdefault(value.url, member)
    return "".join(f"; {m} is in the cache: pass weights={m!r}" for m in others.values())


def resolve_weights(name: str, weights: str):
    """The torchvision weight enum member of model ``name`` called ``weights`` (``"DEFAULT"``,
    a member name such as ``"IMAGENET1K_V1"``, or ``"<Enum>.<member>"``)."""
    enum = torchvision.models.get_model_weights(name)
    valid = list(enum.__members__)
    member = weights
    if isinstance(weights, str) and "." in weights:
        prefix, _, member = weights.partition(".")
        if prefix != enum.__name__:
            member = None
    if not isinstance(member, str) or member not in enum.__members__:
        raise ConfigError(
            f"unknown weights {weights!r} for model {name!r}; valid: {', '.join(valid)} "
            f"(or {enum.__name__}.<name>)"
        )
    return enum[member]


def _timm_model(name: str, weights: str | None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model 'timm:{name}' needs the timm package: pip install timm") from None
    if weights not in (None, "DEFAULT"):
        raise ConfigError(
            f"timm models take weights=None or 'DEFAULT' (pretrained), got {weights!r}; "
            "choose a pretrained tag in the name instead, e.g. 'timm:resnet50.a1_in1k'"
        )
    try:
        return timm.create_model(name, pretrained=weights is not None)
    except RuntimeError as error:
        if "unknown model" not in str(error).lower():
            raise
        hints = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(
            f"unknown timm model {name!r}"
            + (f"; close names: {', '.join('timm:' + h for h in hints)}" if hints else "")
            + " (see timm.list_models())"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot load pretrained weights for 'timm:{name}': {error}") from None


# -- head ------------------------------------------------------------------------------------
def _head_name(model: nn.Module) -> str | None:
    """Module name of the classifier head: the last ``nn.Linear`` registered, else (SqueezeNet)
    the last ``nn.Conv2d`` inside ``classifier``; ``None`` if neither exists."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1]
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Module):
        convs = [n for n, m in classifier.named_modules() if isinstance(m, nn.Conv2d)]
        if convs:
            return f"classifier.{convs[-1]}"
    return None


def _out_features(model: nn.Module, head: str) -> int:
    module = model.get_submodule(head)
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` (in place) a fresh classifier head with ``num_classes`` outputs; see
    :func:`create` for how the head is found. Returns ``model``."""
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
        return model
    head = _head_name(model)
    if head is None:
        raise ConfigError(f"cannot find a classifier head (an nn.Linear) in {type(model).__name__}")
    for name in [head, *(a for a in AUX_HEADS if a != head and _has(model, a))]:
        old = model.get_submodule(name)
        if isinstance(old, nn.Linear):
            new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        else:
            new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride)
        new.to(device=old.weight.device, dtype=old.weight.dtype)
        _set(model, name, new)
    if hasattr(model, "num_classes"):  # SqueezeNet, and others that record it
        model.num_classes = num_classes
    return model


def _has(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# -- CIFAR stem ------------------------------------------------------------------------------
def _is_small_stem(weight: Tensor | None) -> bool:
    return weight is not None and weight.dim() == 4 and tuple(weight.shape[-2:]) == (3, 3)


def pooled_kernel(weight: Tensor) -> Tensor:
    """A 7x7 kernel average-pooled to 3x3: ``F.adaptive_avg_pool2d(weight, 3)``.

    With 7 inputs and 3 outputs, adaptive pooling averages overlapping 3x3 windows whose top
    left corners lie at rows/columns 0, 2 and 4 (output ``i`` covers ``floor(7i/3)`` up to
    ``ceil(7(i+1)/3)``): entry ``[i, j]`` is the mean of ``weight[..., 2i:2i+3, 2j:2j+3]``. No
    rescaling: the kernel's sum shrinks by about 9/49, which the BatchNorm after ``conv1``
    absorbs in training mode.
    """
    return F.adaptive_avg_pool2d(weight, 3)


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """The CIFAR ResNet stem, in place: ``conv1`` (7x7, stride 2) becomes a 3x3, stride-1,
    padding-1 convolution with the :func:`pooled_kernel` of the old weights (bias kept, if
    any), and ``maxpool`` becomes ``nn.Identity()``, so a 32x32 input reaches ``layer1`` at
    32x32. Returns ``model``; a model without a 7x7 ``conv1`` and a ``maxpool`` raises
    :class:`ConfigError`."""
    conv = getattr(model, "conv1", None)
    if (
        not isinstance(conv, nn.Conv2d)
        or tuple(conv.kernel_size) != (7, 7)
        or conv.groups != 1
        or not isinstance(getattr(model, "maxpool", None), nn.Module)
    ):
        raise ConfigError(
            f"cifar_stem needs a ResNet-style stem (a 7x7 conv1 and a maxpool); "
            f"{type(model).__name__} has none"
        )
    new = nn.Conv2d(
        conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(pooled_kernel(conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    model.conv1 = new
    model.maxpool = nn.Identity()
    return model
