"""``sparta.train``: the loop's pieces and small runs of every method, end to end.

The helpers at the top (a tiny CNN, a tiny dataset, a small config) are shared with
``test_resume.py`` and ``test_distributed.py`` (and their subprocesses).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sparta.config import RunConfig
from sparta.tasks import Task, apply_task
from sparta.train import (
    LOG,
    RESULT,
    TASK,
    EpochBatchSampler,
    derive_seed,
    evaluate,
    make_optimizer,
    make_scheduler,
    run,
)


# -- shared helpers ------------------------------------------------------------------------------
def tiny_cnn(batchnorm: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    norm = [nn.BatchNorm2d(8)] if batchnorm else []
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        *norm,
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def tiny_data(n_train: int = 64, n_test: int = 24, seed: int = 1) -> SimpleNamespace:
    """8x8 one-channel images: noise plus one of three stripe patterns (the class)."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    patterns = torch.stack([(i % 2), (j % 2), ((i + j) % 2)]).float()  # rows, columns, checks
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 8, 8, generator=g) + 1.5 * patterns[y].unsqueeze(1)
    return SimpleNamespace(
        train=TensorDataset(x[:n_train], y[:n_train]),
        test=TensorDataset(x[n_train:], y[n_train:]),
        num_classes=3,
    )


def small_config(out_dir, **changes) -> RunConfig:
    base = dict(
        method="splora",
        rank=2,
        criterion="taylor",
        target=0.5,
        steps=2,
        epochs=2,
        recovery_epochs=1,
        batch_size=16,
        scoring_batches=2,
        optimizer="adam",
        lr=0.05,
        output_dir=str(out_dir),
        device="cpu",
    )
    return RunConfig(**{**base, **changes})


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "mask" in k}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- pieces of the loop --------------------------------------------------------------------------
def test_data_order_depends_only_on_seed_and_epoch():
    s = EpochBatchSampler(50, 8, seed=3)
    s.set_epoch(2)
    first = list(s)
    assert len(first) == len(s) == 6 and all(len(b) == 8 for b in first)  # last 2 dropped
    again = EpochBatchSampler(50, 8, seed=3)
    again.set_epoch(2)
    assert list(again) == first
    again.set_epoch(3)
    assert list(again) != first
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)


def test_ranks_take_equal_slices_of_each_global_batch():
    whole = EpochBatchSampler(40, 8, seed=0)
    parts = [EpochBatchSampler(40, 8, seed=0, rank=r, world_size=2) for r in range(2)]
    for a, b, full in zip(*parts, whole):
        assert len(a) == len(b) == 4 and a + b == full
    test = EpochBatchSampler(10, 8, shuffle=False, drop_last=False, rank=1, world_size=2)
    assert list(test) == [[4, 5, 6, 7], [9]]


def test_optimizers_and_schedules():
    p = [nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer(p, "adamw", 0.1), torch.optim.AdamW)
    opt = make_optimizer(p, "sgd", 0.1, momentum=0.5)
    sched = make_scheduler(opt, "cosine", total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    const = make_scheduler(make_optimizer(p, "adam", 0.1), "constant", 4)
    assert const.get_last_lr() == [0.1]
    with pytest.raises(ValueError, match="no trainable"):
        make_optimizer([], "sgd")


def test_evaluate_accuracy_and_loss():
    model = nn.Linear(2, 2)
    x, y = torch.randn(10, 2), torch.randint(0, 2, (10,))
    got = evaluate(model, [(x[:6], y[:6]), (x[6:], y[6:])])
    logits = model(x)
    assert got["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert got["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item())
    assert got["samples"] == 10


# -- runs ----------------------------------------------------------------------------------------
def test_splora_run_end_to_end(tmp_path):
    base, data = tiny_cnn(), tiny_data()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    config = small_config(tmp_path / "run")
    r = run(config, model=base, datasets=data, progress=False)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == sorted([RESULT, TASK, LOG])  # no checkpoint
    result = json.loads((out / RESULT).read_text())
    assert result["config"] == config.to_dict() and result["final"] == r.final
    steps = result["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert [s["density"] for s in steps] == pytest.approx([1.0, 0.75, 0.5])
    for key in ("learned_parameters", "macs"):
        assert steps[0][key] > steps[1][key] > steps[2][key]
    assert all(0 <= s["accuracy"] <= 1 and s["loss"] > 0 for s in steps)
    assert max(s["accuracy"] for s in steps) > 0.6  # the stripes are learnable
    assert len(result["pruning"]) == 2 and result["timings"]["run_s"] > 0
    assert result["final"]["task_bytes"] == (out / TASK).stat().st_size
    log = (out / LOG).read_text()
    assert "pruning step 2/2" in log and "finished" in log
    # the caller's model is untouched; the task rebuilds the trained model on it
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    rebuilt = apply_task(base, Task.load(out / TASK)).eval()
    x = data.test.tensors[0]
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), r.model.eval()(x), atol=1e-5)


def test_fine_pruning_trains_every_weight_and_saves_its_compact_model(tmp_path):
    r = run(
        small_config(tmp_path, method="fine-pruning", criterion="l1"),
        tiny_cnn(),
        tiny_data(),
        progress=False,
    )
    assert all(p.requires_grad for p in r.model.parameters())
    assert [s["density"] for s in r.steps] == pytest.approx([1.0, 0.75, 0.5])
    # the baseline's compact model (tests/test_baseline.py): every kept weight, no adapter
    size = (tmp_path / TASK).stat().st_size
    assert r.final["task_bytes"] == size and r.files["task"] == tmp_path / TASK
    assert Task.load(tmp_path / TASK).adapter == "fine-pruning"
    kept = masks(r.model)
    assert kept and sum(float(m.sum()) for m in kept.values()) < sum(
        m.numel() for m in kept.values()
    )


def test_finetune_does_not_prune(tmp_path):
    r = run(
        small_config(tmp_path, method="finetune", epochs=1), tiny_cnn(), tiny_data(), progress=False
    )
    assert [s["step"] for s in r.steps] == [0] and r.result["pruning"] == []
    assert r.final["density"] == 1.0 and r.final["epochs_trained"] == 1
    assert r.final["learned_parameters"] == sum(p.numel() for p in tiny_cnn().parameters())


def test_default_model_and_dataset_factories(tmp_path):
    """Without injected model and data: sparta.models.create and sparta.data.load_dataset."""
    config = small_config(
        tmp_path, model="digits_cnn", dataset="digits", epochs=1, steps=1, batch_size=64
    )
    r = run(config, progress=False)
    assert r.model.sparta_report.adapter == "splora"
    assert r.steps[-1]["density"] == pytest.approx(0.5, abs=0.05)
    assert 0 < r.final["accuracy"] <= 1 and r.files["task"].exists()


def test_completed_runs_are_not_rerun(tmp_path):
    config = small_config(tmp_path, steps=1, epochs=1, criterion="l2")
    first = run(config, tiny_cnn(), tiny_data(), progress=False)
    again = run(config, tiny_cnn(), tiny_data(), progress=False, resume=True)
    assert again.skipped and again.model is None
    assert again.final == first.final and again.steps == first.steps
    assert again.files["task"] == first.files["task"]


def test_run_leaves_the_callers_generators_alone(tmp_path):
    model, data = tiny_cnn(), tiny_data()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    run(small_config(tmp_path, method="finetune", epochs=1), model, data, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_diverging_loss_stops_the_run(tmp_path):
    data = tiny_data()
    data.train.tensors[0][3] = float("nan")
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        run(small_config(tmp_path, method="finetune", epochs=1), tiny_cnn(), data, progress=False)


def test_run_refuses_bad_setups(tmp_path):
    with pytest.raises(ValueError, match="larger than the training set"):
        run(small_config(tmp_path, batch_size=128), tiny_cnn(), tiny_data(), progress=False)
    with pytest.raises(TypeError):
        run("config.yaml")
