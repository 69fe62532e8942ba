"""The built-in ``digits_cnn``: a small CNN for 8x8 or 16x16 grayscale digits (offline demo base)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """Three 3x3 conv + BatchNorm + ReLU blocks (16, 32, 64 channels; a 2x2 max-pool after the
    second), global average pooling and a ``Linear(64, num_classes)`` head named ``head``.

    Made for ``1x8x8`` (``sparta.data`` ``digits``) or ``1x16x16`` inputs; thanks to the global
    pooling any input of at least 2x2 works. Module names: ``features.*`` and ``head``.
    """
    features = nn.Sequential(
        *_conv_block(in_channels, 16),
        *_conv_block(16, 32),
        nn.MaxPool2d(2),
        *_conv_block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(64, num_classes)))
