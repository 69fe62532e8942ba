"""``sparta.integrations.lightning.SpartaCallback`` the ways Lightning users train: the network
nested deep in the LightningModule, manual optimisation, ``accumulate_grad_batches``,
``max_steps``, ``precision="bf16-mixed"`` on CPU, a validation loop, and resuming from a
Lightning checkpoint (``fit(..., ckpt_path=...)``), which must end as the run that was never
stopped. Every exported task builds into a compact model equal to the trained one."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sparta
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)

pl = pytest.importorskip("lightning.pytorch")
from sparta.integrations.lightning import SpartaCallback  # noqa: E402
from test_integrations_lightning import _cnn  # noqa: E402  (the same small CNN)

PATH = "model.backbone.inner"  # where the network sits in the LightningModule


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)
    )


class Deep(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.backbone = nn.ModuleDict({"inner": net})

    def forward(self, x):
        return self.backbone["inner"](x)


class Lit(pl.LightningModule):
    def __init__(self, net: nn.Module, manual: bool = False):
        super().__init__()
        self.model = Deep(net)
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01)


def _loader():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 8, 8, generator=gen)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    return x, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)


CHANNELS = dict(
    adapter_options={"rank": 4},
    pruner_options={"criterion": "taylor", "target": 0.5, "steps": 2},
    scoring_batches=2,
    unit="steps",
    every=3,
)
BLOCKS = dict(
    adapter_options={"block": 4, "prototypes": 2},
    pruner_options={"criterion": "movement", "target": 0.5, "warmup_steps": 1, "cooldown_steps": 2},
)


def _trainer(callbacks, **options) -> pl.Trainer:
    settings = dict(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    settings.update(options)
    return pl.Trainer(callbacks=callbacks, **settings)


def _callback(adapter, options, path=None):
    return SpartaCallback(adapter, module=PATH, **options, export_path=path)


def _base(adapter):
    return _mlp() if adapter == "splopa" else _cnn()


def _check(base, lit, path):
    x, _ = _loader()
    net = lit.model.backbone["inner"].eval()
    compact = sparta.build(base.eval(), sparta.Task.load(path))
    with torch.no_grad():
        want, got = net(x[:8]), compact(x[:8])
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


@pytest.mark.parametrize(
    ("adapter", "options", "lit", "trainer", "steps"),
    [
        ("splora", CHANNELS, {"manual": True}, {}, 12),
        ("splopa", BLOCKS, {"manual": True}, {}, 12),
        ("splora", CHANNELS, {}, {"accumulate_grad_batches": 2}, 6),
        ("splora", CHANNELS, {}, {"max_steps": 7, "max_epochs": -1}, 7),
        ("splora", CHANNELS, {}, {"precision": "bf16-mixed"}, 12),
        ("splopa", BLOCKS, {}, {"precision": "bf16-mixed"}, 12),
    ],
    ids=["manual", "manual-blocks", "accumulate", "max-steps", "bf16", "bf16-blocks"],
)
def test_each_way_of_training_builds_exactly(tmp_path, adapter, options, lit, trainer, steps):
    base, path = _base(adapter), tmp_path / "task.sparta"
    callback = _callback(adapter, options, path)
    module, loader = Lit(copy.deepcopy(base), **lit), _loader()[1]
    fit = _trainer([callback], **trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="export: no compact plan")
        fit.fit(module, loader, loader)  # with a validation loop
    assert fit.global_step == steps and callback.pruner.done
    assert callback.pruner.achieved()["density"] <= 0.5 + 1e-9
    assert any(isinstance(m, sparta.AdaptedLayer) for m in module.model.modules())
    _check(base, module, path)


def _masks_and_weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("adapter", "options", "every"),
    [
        ("splora", CHANNELS, {"every_n_train_steps": 4}),
        ("splora", {**CHANNELS, "unit": "epochs", "every": 1}, {"every_n_epochs": 1}),
        ("splopa", BLOCKS, {"every_n_train_steps": 4}),
    ],
    ids=["channels-steps", "channels-epochs", "blocks"],
)
def test_resuming_from_a_checkpoint_ends_as_the_uninterrupted_run(
    tmp_path, adapter, options, every
):
    """The callback's state (units counted, the pruner's history, a block criterion's scores)
    travels in the checkpoint; the masks of plain layers (norms, the head: parametrised
    weights) are made before the checkpoint loads (Lightning refused it: "Unexpected key(s)
    ... parametrizations.weight.original"), and the resumed pruner counts the channels the run
    started from (it counted the kept ones and pruned more than the uninterrupted run)."""
    base, loader = _base(adapter), _loader()[1]
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, **every)
    whole = Lit(copy.deepcopy(base))
    _trainer([_callback(adapter, options), saver], enable_checkpointing=True).fit(whole, loader)
    checkpoint = sorted((tmp_path / "ck").iterdir())[0]  # after step 4, one pruning step in
    path = tmp_path / "task.sparta"
    callback = _callback(adapter, options, path)
    resumed = Lit(copy.deepcopy(base))
    _trainer([callback]).fit(resumed, loader, ckpt_path=checkpoint)
    assert callback.pruner.done
    want, got = _masks_and_weights(whole), _masks_and_weights(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6), key
    _check(base, resumed, path)
