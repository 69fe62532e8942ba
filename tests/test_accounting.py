"""Both parameter accountings of ``sparta.learned_parameters`` ("stored": what a task file holds;
"paper": Table 1's), filter vs weight targets, and ``sparta.report``'s columns.

The figures are the paper's (Table 1, ResNet-50 with 10 classes): SPLoRA r8 466,338 and r32
1,644,522 unpruned, full fine-tuning 23,528,522; its r32-minus-r8 counts leave a constant 73.7 K
(all 53,120 BatchNorm + all 20,490 fc parameters) at every density.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import sparta
import sparta.models
from sparta import Target
from sparta.masks import can_mask, ensure_masks
from sparta.tasks import Task
from tiny_models import ResidualNet, tiny_bert

BN_AFFINE, FC = 53_120, 20_490  # ResNet-50's BatchNorm affine and fc(2048 -> 10) parameters


def masks_of(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{module: (mask_out, mask_in)}`` of every masked layer and norm."""
    found = {}
    for name, module in model.named_modules():
        if can_mask(module):
            out, inp = ensure_masks(module, create=False)
            if out is not None:
                found[name] = (out, inp)
    return found


def copy_masks(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` (adapted or plain, same architecture) the masks of ``src``."""
    for name, (out, inp) in masks_of(src).items():
        d_out, d_in = ensure_masks(dst.get_submodule(name))
        with torch.no_grad():
            d_out.copy_(out)
            if inp is not None:
                d_in.copy_(inp)


def nnz(t: torch.Tensor) -> int:
    return int(t.count_nonzero())


def adapter_sides(model: nn.Module) -> int:
    """Sum over adapted layers of kept in + kept out channels, from the masks themselves."""
    return sum(
        nnz(m.adapter.mask_in) + nnz(m.adapter.mask_out)
        for m in model.modules()
        if isinstance(m, sparta.AdaptedLayer)
    )


def pruned_whole_entries(model: nn.Module, head: str) -> int:
    """Trainable entries of norms and of the head that the masks cut: the difference of the
    two accountings, counted here from the masks and shapes alone."""
    total = 0
    for name, (out, inp) in masks_of(model).items():
        module = model.get_submodule(name)
        trainable = [p for p in module.parameters() if p.requires_grad]
        if isinstance(module, nn.BatchNorm2d | nn.LayerNorm | nn.BatchNorm1d):
            total += (out.numel() - nnz(out)) * len(trainable)
        elif name == head:
            weight = module.parametrizations.weight.original
            kept = nnz(out[:, None] * inp[None, :]) * weight[0, 0].numel()
            total += weight.numel() - kept if weight.requires_grad else 0
            if module.bias is not None and module.parametrizations.bias.original.requires_grad:
                total += out.numel() - nnz(out)
    return total


# -- ResNet-50 with the CIFAR stem: the paper's figures --------------------------------------------
@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return sparta.models.create("resnet50", num_classes=10, cifar_stem=True)


@pytest.fixture(scope="module")
def pruned50(resnet50):
    """SPLoRA r8 and r32 on ResNet-50 under ONE mask: l1, global ranking, filter density 0.3 in
    two steps on the r8 model, copied to the r32 one."""
    torch.manual_seed(0)
    r8 = sparta.wrap(resnet50, "splora", rank=8)
    pruner = sparta.Pruner(
        r8, torch.randn(2, 3, 32, 32), criterion="l1", target=Target("density", 0.3), steps=2
    )
    while not pruner.done:
        pruner.step()
    r32 = sparta.wrap(resnet50, "splora", rank=32)
    copy_masks(r8, r32)
    return {8: r8, 32: r32}, pruner


def test_unpruned_resnet50_counts_are_the_papers(resnet50):
    bn = sum(m.weight.numel() + m.bias.numel() for m in resnet50.modules() if _is_bn(m))
    assert (bn, resnet50.fc.weight.numel() + resnet50.fc.bias.numel()) == (BN_AFFINE, FC)
    for rank, count in ((8, 466_338), (32, 1_644_522)):
        model = sparta.wrap(resnet50, "splora", rank=rank)
        assert sparta.learned_parameters(model) == count
        assert sparta.learned_parameters(model, accounting="paper") == count
    # Full fine-tuning: the paper's 23,528,522 is torchvision's 7x7 stem; the CIFAR stem's 3x3
    # conv1 has 64 * 3 * (49 - 9) fewer weights (the adapters' counts do not depend on kernels).
    cifar = 23_528_522 - 64 * 3 * (49 - 9)
    assert sparta.learned_parameters(resnet50, accounting="paper") == cifar
    assert sparta.learned_parameters(resnet50) == cifar
    plain = torchvision.models.resnet50(weights=None, num_classes=10)
    assert sparta.learned_parameters(plain, accounting="paper") == 23_528_522


def test_r32_minus_r8_is_the_papers_formula_and_norms_plus_head_are_constant(resnet50, pruned50):
    models, pruner = pruned50
    assert pruner.achieved()["density"] == pytest.approx(0.3, abs=0.01)
    sides = adapter_sides(models[8])
    assert sides == adapter_sides(models[32])
    assert 0.25 < sides / adapter_sides(sparta.wrap(resnet50, rank=1)) < 0.35
    paper = {r: sparta.learned_parameters(m, accounting="paper") for r, m in models.items()}
    stored = {r: sparta.learned_parameters(m) for r, m in models.items()}
    assert paper[32] - paper[8] == (32 - 8) * sides == stored[32] - stored[8]
    for rank in (8, 32):  # what is not an adapter: every BatchNorm and the whole fc, pruned or not
        assert paper[rank] - rank * sides == BN_AFFINE + FC


def test_stored_keeps_only_kept_norm_channels_and_head_columns(pruned50):
    models, _ = pruned50
    for rank, model in models.items():
        masks = masks_of(model)
        kept_bn = sum(2 * nnz(masks[n][0]) for n, m in model.named_modules() if _is_bn(m))
        fc_out, fc_in = masks["fc"]
        assert nnz(fc_out) == 10  # the head's outputs are never pruned
        kept_fc = 10 * nnz(fc_in) + 10
        stored = sparta.learned_parameters(model)
        assert stored == rank * adapter_sides(model) + kept_bn + kept_fc
        gap = sparta.learned_parameters(model, accounting="paper") - stored
        assert gap == (BN_AFFINE - kept_bn) + (FC - kept_fc) == pruned_whole_entries(model, "fc")
        assert gap > 0.25 * BN_AFFINE  # about 70% of the channels are gone


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d)


# -- filter density vs weight density --------------------------------------------------------------
def weight_density(model: nn.Module) -> float:
    """Kept fraction of the conv and linear weights, from the masks (independent of Pruner)."""
    kept = total = 0
    for m in model.modules():
        if isinstance(m, sparta.AdaptedLayer):
            per = m.base.weight[0, 0].numel()
            kept += nnz(m.adapter.mask_out[:, None] * m.adapter.mask_in[None, :]) * per
            total += m.base.weight.numel()
    return kept / total


def test_density_keeps_filters_and_sparsity_removes_weights(resnet50, pruned50):
    models, pruner = pruned50
    d = pruner.achieved()["density"]
    assert d == pytest.approx(0.3, abs=0.01)
    kept_weights = weight_density(models[8])
    assert kept_weights == pytest.approx(1 - pruner.achieved()["sparsity"], abs=0.01)
    # Filters go from a layer's rows and the next one's columns: about d**2 of the weights stay.
    assert kept_weights < 0.4 * d
    assert 0.7 * d**2 < kept_weights < 1.3 * d**2
    model = sparta.wrap(resnet50, "splora", rank=8)
    by_weights = sparta.Pruner(model, torch.randn(2, 3, 32, 32), target=Target("sparsity", 0.7))
    by_weights.step()
    achieved = by_weights.achieved()
    assert achieved["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert weight_density(model) == pytest.approx(0.3, abs=0.01)
    assert achieved["density"] > 0.45  # about sqrt(0.3) of the filters stay


# -- paper - stored across model families -----------------------------------------------------------
def _mobilenet():
    return torchvision.models.mobilenet_v3_small(num_classes=10), torch.randn(2, 3, 32, 32)


def _timm(name):
    def make():
        timm = pytest.importorskip("timm")
        if name not in timm.list_models(name):
            pytest.skip(f"timm {timm.__version__} has no {name} (timm >= 1.0 does)")
        return timm.create_model(name, pretrained=False, num_classes=7), torch.randn(2, 3, 32, 32)

    return make


def _bert():
    pytest.importorskip("transformers")
    return tiny_bert(), {"input_ids": torch.randint(0, 50, (2, 8))}


def _residual():
    return ResidualNet(), torch.randn(2, 3, 8, 8)


OPTIONS = {"splora": {"rank": 4}}
FAMILIES = {  # id: (factory, adapter or None for fine-pruning, the head's name, norms/head cut?)
    "tv-mobilenet_v3_small-splora": (_mobilenet, "splora", "classifier.3", True),
    "timm-test_efficientnet-sppara": (_timm("test_efficientnet"), "sppara", "classifier", True),
    # ConvNeXt's norms sit on the residual stream, which feeds the head: never pruned.
    "timm-test_convnext-splora": (_timm("test_convnext"), "splora", "head.fc", False),
    "hf-bert-splora": (_bert, "splora", "classifier", True),  # the pooler's outputs are cut
    "fine-pruned-residualnet": (_residual, None, "fc", True),
    "fine-pruned-mobilenet_v3_small": (_mobilenet, None, "classifier.3", True),
}


@pytest.mark.filterwarnings("ignore::sparta.SkippedLayerWarning")
@pytest.mark.parametrize("case", list(FAMILIES))
def test_paper_minus_stored_is_the_pruned_norm_and_head_entries(case):
    factory, adapter, head, cut = FAMILIES[case]
    torch.manual_seed(0)
    base, x = factory()
    model = base if adapter is None else sparta.wrap(base, adapter, **OPTIONS.get(adapter, {}))
    assert sparta.heads.head_of(model) == [head]
    before = sparta.learned_parameters(model)
    assert sparta.learned_parameters(model, accounting="paper") == before
    sparta.Pruner(model, x, criterion="l1", target=0.5).step()
    stored = sparta.learned_parameters(model)
    paper = sparta.learned_parameters(model, accounting="paper")
    assert stored < before
    assert paper - stored == pruned_whole_entries(model, head)
    assert (paper > stored) == cut


def test_an_unknown_accounting_is_refused_with_the_choices():
    with pytest.raises(sparta.ConfigError, match="'stored', 'paper'.*'Paper'"):
        sparta.learned_parameters(nn.Linear(2, 2), accounting="Paper")


def test_frozen_norms_and_head_count_in_neither_accounting():
    torch.manual_seed(0)
    model = sparta.wrap(ResidualNet(), "splora", rank=2, train_norms=False)
    model.fc.requires_grad_(False)
    sparta.Pruner(model, torch.randn(2, 3, 8, 8), criterion="l1", target=0.5).step()
    assert sparta.learned_parameters(model, accounting="paper") == sparta.learned_parameters(model)


# -- sparta.report: both accountings, the task's and fine-pruning's ------------------------------------
def test_report_carries_both_accountings_for_the_task_and_fine_pruning(tmp_path):
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    model = sparta.wrap(base, "splora", rank=4)
    sparta.Pruner(model, x, criterion="l1", target=0.3).step()
    task = sparta.export(model)
    counts = task.manifest["counts"]
    assert counts["learned_parameters"] == sparta.learned_parameters(model)
    assert counts["learned_parameters_paper"] == sparta.learned_parameters(model, "paper")
    # A file written before the paper's count was recorded: counted on the task model.
    old = Task(task.tensors, {**task.manifest, "counts": {**counts}})
    del old.manifest["counts"]["learned_parameters_paper"]
    old_path = tmp_path / "old.safetensors"
    old.save(old_path)
    report = sparta.report(base, {"new": task, "old": Task.load(old_path)})
    fine_pruned = torchvision.models.resnet18(num_classes=10)
    fine_pruned.load_state_dict(base.state_dict())
    copy_masks(model, fine_pruned)
    for row in report.rows:
        assert row.learned_parameters == sparta.learned_parameters(model)
        assert row.learned_parameters_paper == sparta.learned_parameters(model, "paper")
        assert row.learned_parameters < row.learned_parameters_paper
        assert row.finepruned_learned == sparta.learned_parameters(fine_pruned) == row.params
        assert row.finepruned_learned_paper == sparta.learned_parameters(fine_pruned, "paper")
        assert row.learned_ratio == row.finepruned_learned / row.learned_parameters
        paper_ratio = row.finepruned_learned_paper / row.learned_parameters_paper
        assert row.learned_ratio_paper == paper_ratio
    header = report.to_markdown().splitlines()[0]
    for label in ("filter density", "learned (stored)", "learned (paper)"):
        assert f"| {label} |" in header
    assert report.to_dict()[0]["learned_ratio_paper"] == report.rows[0].learned_ratio_paper
