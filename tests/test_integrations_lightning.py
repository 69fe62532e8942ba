"""``sparta.integrations.lightning.SpartaCallback`` (issue #14, item 2): a tiny CNN trained
with Lightning on CPU ends in a task file that ``sparta.build`` turns into a compact model
equal to the masked one; the figures reach the trainer's logger."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from torch import nn

import sparta
from sparta.errors import ConfigError
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)

pl = pytest.importorskip("lightning.pytorch")
from sparta.integrations.lightning import SpartaCallback  # noqa: E402


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1, stride=2),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 3),
    )


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _data(n: int = 48):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    return x, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)


def _fit(tmp_path, callback, epochs: int = 3, net=None, **options):
    base = _cnn().train()
    x, loader = _data()
    lit = Classifier(net if net is not None else copy.deepcopy(base))
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(str(tmp_path / "logs")),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **options,
    )
    trainer.fit(lit, loader)
    return base, lit, trainer, x


def _logged(trainer, key: str) -> list[float]:
    path = f"{trainer.logger.log_dir}/metrics.csv"
    with open(path, newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


@pytest.mark.parametrize(
    ("adapter", "criterion", "unit", "every"),
    [
        ("splora", "taylor", "epochs", 1),
        ("splora", "l1", "steps", 3),
        ("sppara", "lrp", "steps", 4),
    ],
)
def test_channel_pruning_with_lightning_builds_exactly(tmp_path, adapter, criterion, unit, every):
    path = tmp_path / "task.sparta"
    callback = SpartaCallback(
        adapter,
        module="net",
        adapter_options={"rank": 4} if adapter == "splora" else {},
        pruner_options={"criterion": criterion, "target": 0.5, "steps": 2},
        every=every,
        unit=unit,
        scoring_batches=2,
        export_path=path,
    )
    base, lit, trainer, x = _fit(tmp_path, callback)
    achieved = callback.pruner.achieved()
    assert callback.pruner.done and achieved["density"] < 1.0 and achieved["macs"] < 1.0
    compact = sparta.build(base.eval(), sparta.Task.load(path))
    net = lit.net.eval()
    with torch.no_grad():
        want, got = net(x[:8]), compact(x[:8])
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert compact[3].out_channels < 24  # physically pruned
    density = _logged(trainer, "sparta/density")
    assert density[-1] == pytest.approx(achieved["density"])
    assert all(b <= a for a, b in zip(density, density[1:])) and density[-1] < 1.0
    learned = _logged(trainer, "sparta/learned")
    assert learned[-1] == sparta.learned_parameters(lit.net)


def test_fine_pruning_a_plain_network(tmp_path):
    """No adapter: every weight trains, masks still decide (the baseline)."""
    callback = SpartaCallback(
        module="net", pruner_options={"criterion": "l2", "target": 0.5}, unit="steps", every=2
    )
    _, lit, _, _ = _fit(tmp_path, callback, epochs=1)
    assert not any(isinstance(m, sparta.AdaptedLayer) for m in lit.modules())
    assert callback.pruner.achieved()["density"] < 1.0
    assert all(p.requires_grad for p in lit.net.parameters())


def test_gradient_accumulation_counts_optimiser_steps(tmp_path):
    callback = SpartaCallback(
        "splora", module="net", pruner_options={"steps": 2, "target": 0.5}, unit="steps", every=2
    )
    # 4 batches per epoch, 2 per optimiser step: steps 2 and 4 prune (epochs 1 and 2)
    _, _, trainer, _ = _fit(tmp_path, callback, epochs=2, accumulate_grad_batches=2)
    assert trainer.global_step == 4 and callback.pruner.done


def test_unknown_module_is_named(tmp_path):
    callback = SpartaCallback("splora", module="backbone")
    with pytest.raises(ConfigError, match="'backbone' is not a submodule.*children are: net"):
        _fit(tmp_path, callback, epochs=1)
