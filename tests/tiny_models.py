"""Tiny models covering the layer geometries the adapters must handle (contract tests)."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(12, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU()
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(x))

    @staticmethod
    def example(batch=3):
        return torch.randn(batch, 12)


class Conv1dNet(nn.Module):
    """Reflect padding, 'same' padding with dilation and groups, 'valid' with stride."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(4, 8, 3, padding=1, padding_mode="reflect"),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Conv1d(8, 8, 5, dilation=2, padding="same", groups=2),
            nn.ReLU(),
            nn.Conv1d(8, 6, 3, stride=2, padding="valid"),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.features(x))

    @staticmethod
    def example(batch=3):
        return torch.randn(batch, 4, 17)


class Conv2dNet(nn.Module):
    """Stride, depthwise, non-square kernels, circular padding, dilation, padding > half kernel."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
            nn.Conv2d(8, 12, (1, 3), padding=(0, 1), padding_mode="circular"),
            nn.ReLU(),
            nn.Conv2d(12, 12, (3, 5), stride=(1, 2), dilation=(2, 1), padding=(3, 2)),
            nn.BatchNorm2d(12),
            nn.Conv2d(12, 10, 1, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(10, 5)

    def forward(self, x):
        return self.classifier(self.features(x))

    @staticmethod
    def example(batch=3):
        return torch.randn(batch, 3, 15, 13)


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(2, 4, 3, padding=1, padding_mode="replicate"),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.Conv3d(4, 6, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), groups=2),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.features(x))

    @staticmethod
    def example(batch=2):
        return torch.randn(batch, 2, 5, 7, 6)


class AttentionBlock(nn.Module):
    """Self-attention (packed q/k/v) and cross-attention (separate q/k/v with kdim/vdim)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.cross = nn.MultiheadAttention(16, 2, kdim=6, vdim=6, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        h = h + self.cross(h, x, x, need_weights=False)[0]
        h = h + self.ffn(h)
        return self.head(h.mean(1))

    @staticmethod
    def example(batch=3):
        return torch.randn(batch, 5, 6)


class ResidualNet(nn.Module):
    """Residual addition, concatenation, a depthwise conv and a flatten into the head, for
    ``image`` x ``image`` inputs (pruning and compaction tests)."""

    def __init__(self, image: int = 8, stem_stride: int = 1):
        super().__init__()
        side = math.ceil(math.ceil(image / stem_stride) / 2)  # after the stem, then mix
        self.stem = nn.Conv2d(3, 8, 3, stride=stem_stride, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.side = nn.Conv2d(8, 6, 1)
        self.mix = nn.Conv2d(14, 10, 3, stride=2, padding=1)
        self.fc = nn.Linear(10 * side * side, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.dw(torch.relu(self.branch(h)))
        h = torch.cat([h, self.side(h)], 1)
        return self.fc(torch.flatten(torch.relu(self.mix(h)), 1))


def perturb(model: nn.Module, seed: int = 3) -> None:
    """Non-trivial adapters and BatchNorm statistics, so that equivalence errors would show."""
    import sparta

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sparta.Adapter):
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def tiny_bert(vocab_size: int = 50, hidden_size: int = 32, intermediate_size: int = 48, **config):
    """A small Hugging Face BERT classifier (2 layers, 4 heads, 3 labels) built from a config:
    no download. Needs transformers (callers skip without it)."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate_size,
        num_labels=3,
        **config,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


TINY_MODELS = {
    "mlp": MLP,
    "conv1d": Conv1dNet,
    "conv2d": Conv2dNet,
    "conv3d": Conv3dNet,
    "attention": AttentionBlock,
}
