"""What wrapping a model adapts and learns, against full fine-tuning (``sparta inspect``)."""

from __future__ import annotations

import warnings

from torch import nn

from ..adapters import get_adapter
from ..errors import ConfigError, SkippedLayerWarning, UnknownNameError
from ..measure import learned_parameters
from ..wrapping import wrap

#: Shown when a model name has no close match (a few families, not the whole list).
EXAMPLE_MODELS = ("resnet50", "vit_b_16", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny")


def torchvision_model(name: str, num_classes: int) -> nn.Module:
    """A torchvision classification model with random weights (nothing is downloaded)."""
    import torchvision  # heavy: imported only when a model is built

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ConfigError(f"num-classes must be a positive integer, got {num_classes!r}")
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UnknownNameError("torchvision classification model", name, known, EXAMPLE_MODELS)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def adapter_options(adapter: str, rank: int) -> tuple[dict, bool]:
    """``(options for wrap, whether the adapter takes a rank)``: ``rank`` goes only to
    adapters that take one; the other options keep their defaults."""
    cls = get_adapter(adapter)
    if "rank" in cls.option_names():
        return cls.resolve_options({"rank": rank}), True
    return cls.resolve_options({}), False


def inspect_summary(
    name: str, num_classes: int, adapter: str, options: dict, include, exclude
) -> dict:
    """Wrap ``name`` and count what the task learns against full fine-tuning."""
    base = torchvision_model(name, num_classes)
    with warnings.catch_warnings():
        # Skipped layers are part of the summary (its report); no need to warn twice.
        warnings.simplefilter("ignore", SkippedLayerWarning)
        adapted = wrap(base, adapter, include=include, exclude=exclude, **options)
    total = sum(p.numel() for p in base.parameters())
    learned = learned_parameters(adapted)
    return {
        "model": name,
        "num_classes": num_classes,
        "adapter": adapter,
        "options": options,
        "params": {
            "base_total": total,
            "learned": learned,
            "full_finetune": total,
            "learned_vs_full": learned / total,
        },
        "report": adapted.sparta_report.to_dict(),
    }
