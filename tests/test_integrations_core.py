"""The trainer-independent part of the callbacks (``sparta.integrations.core.PruningDriver``):
its options, batches, schedule and penalty, without Hugging Face or Lightning."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import sparta
from sparta.errors import ConfigError
from sparta.integrations.core import PruningDriver, default_loss, default_split, in_order
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)
from tiny_models import MLP


def test_importing_the_integrations_loads_no_framework():
    code = (
        "import sys, sparta, sparta.integrations, sparta.integrations.core\n"
        "print(sorted(m for m in ('transformers', 'lightning', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"unit": "batches"}, "unit must be 'epochs' or 'steps'"),
        ({"every": 0}, "every must be an integer >= 1, got 0"),
        ({"start": -1}, "start must be an integer >= 0"),
        ({"scoring_batches": 1.5}, "scoring_batches must be an integer"),
        ({"penalty_weight": float("nan")}, "penalty_weight must be a finite number >= 0"),
        ({"penalty_weight": -1}, "penalty_weight must be a finite number >= 0"),
        ({"adapter_options": [4]}, "adapter_options must be a dict"),
        ({"loss_fn": "ce"}, "loss_fn must be a function"),
        ({"adapter": 3}, "adapter must be an adapter name or None"),
    ],
)
def test_bad_options_are_refused_when_made(options, message):
    with pytest.raises(ConfigError, match=message):
        PruningDriver(**options)


def test_batches_split_as_pairs_or_labelled_dicts():
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert default_split((x, y)) == (x, y)
    inputs, targets = default_split({"input_ids": x, "labels": y})
    assert set(inputs) == {"input_ids"} and targets is y
    with pytest.raises(ConfigError, match=r"dict with keys \['input_ids'\].*split_batch="):
        default_split({"input_ids": x})
    with pytest.raises(ConfigError, match="got a Tensor"):
        default_split(x)


def test_default_loss_flattens_token_logits_and_ignores_padding():
    logits, targets = torch.randn(2, 5, 3), torch.tensor([[0, 1, 2, -100, -100], [2] * 5])
    want = nn.functional.cross_entropy(logits[targets != -100], targets[targets != -100])
    assert torch.allclose(default_loss(logits, targets), want)


def test_prepare_wraps_in_place_and_refuses_what_cannot_export():
    model = MLP()
    driver = PruningDriver("splora", {"rank": 2}, export_path="t.sparta")
    assert driver.prepare(model) is model
    assert isinstance(model.body[0], sparta.AdaptedLayer)
    with pytest.raises(ConfigError, match="export_path needs a model wrapped by sparta.wrap"):
        PruningDriver(export_path="t.sparta").prepare(MLP())
    with pytest.raises(ConfigError, match="given without an adapter"):
        PruningDriver(adapter_options={"rank": 2}).prepare(MLP())
    wrapped = sparta.wrap(MLP(), "splora", rank=2)
    assert PruningDriver("splora").prepare(wrapped) is wrapped  # taken as it is
    with pytest.raises(ConfigError, match="already wrapped with 'splora', not 'sppara'"):
        PruningDriver("sppara").prepare(wrapped)


def test_scoring_reads_the_dataset_in_order_without_touching_the_random_state():
    data = torch.utils.data.TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    state = torch.random.get_rng_state()
    batches = [y.tolist() for _, y in in_order(loader)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert in_order([(1, 2)]) == [(1, 2)]  # not a loader: read as it is


def _schedule(unit: str, every: int, start: int, steps: int, length: int) -> list[int]:
    """The units after which the driver's channel pruner stepped, over ``length`` units."""
    model = sparta.wrap(MLP(), "splora", rank=2)
    x, y = MLP.example(4), torch.randint(0, 4, (4,))
    driver = PruningDriver(
        pruner_options={"criterion": "taylor", "target": 0.5, "steps": steps},
        every=every,
        unit=unit,
        start=start,
        scoring_batches=1,
    )
    driver.begin(model, [(x, y)], total_steps=length, epochs=length)
    when = []
    for i in range(1, length + 1):
        stepped = (
            driver.after_optimizer_step(lambda: [(x, y)])
            if unit == "steps"
            else driver.after_epoch(lambda: [(x, y)])
        )
        if stepped:
            when.append(i)
    assert driver.pruner.done and len(driver.pruner.history) == steps
    return when


@pytest.mark.parametrize("unit", ["steps", "epochs"])
@pytest.mark.parametrize(
    ("every", "start", "steps", "want"),
    [(1, 1, 3, [1, 2, 3]), (2, 2, 3, [2, 4, 6]), (3, 0, 2, [3, 6]), (2, 1, 2, [1, 3])],
)
def test_channel_steps_follow_every_and_start(unit, every, start, steps, want):
    length = max(want) + 2  # recovery after the last step
    assert _schedule(unit, every, start, steps, length) == want


def test_too_short_a_run_is_refused():
    model = sparta.wrap(MLP(), "splora", rank=2)
    driver = PruningDriver(pruner_options={"steps": 3}, every=2, unit="steps")
    with pytest.raises(ConfigError, match=r"too short for 3 pruning steps.*after 6.*has 5 steps"):
        driver.begin(model, [(MLP.example(), torch.zeros(3).long())], total_steps=5, epochs=1)


def _blocks(criterion: str, weight: float):
    torch.manual_seed(0)
    model = sparta.wrap(MLP(), "splopa", block=4, prototypes=2)
    driver = PruningDriver(
        pruner_options={"criterion": criterion, "target": 0.5}, penalty_weight=weight
    )
    x, y = MLP.example(6), torch.randint(0, 4, (6,))
    driver.begin(model, [(x, y)], total_steps=4, epochs=1)
    return model, driver, x, y


@pytest.mark.parametrize("criterion", ["soft-movement", "l0"])
def test_penalty_gradient_equals_adding_it_to_the_loss(criterion):
    """The callbacks cannot change the trainer's loss; back-propagating the penalty alone
    before the optimiser step must give the gradients of ``loss + lam * penalty``."""
    lam = 0.7
    model, driver, x, y = _blocks(criterion, lam)
    torch.manual_seed(1)  # l0 samples its gates: the same draw in both passes
    loss = default_loss(model(x), y)
    (loss + lam * driver.pruner.penalty()).backward()
    want = {id(p): p.grad.clone() for p in driver.pruner.parameters()}
    for p in driver.pruner.parameters():
        p.grad = None
    model.zero_grad()
    torch.manual_seed(1)
    default_loss(model(x), y).backward()
    driver.before_optimizer_step()
    for p in driver.pruner.parameters():
        assert torch.allclose(p.grad, want[id(p)], atol=1e-7)
        assert not torch.equal(p.grad, want[id(p)] * 0)


def test_channel_criteria_refuse_a_penalty():
    model = sparta.wrap(MLP(), "splora", rank=2)
    driver = PruningDriver(pruner_options={"criterion": "l1"}, penalty_weight=0.1)
    with pytest.raises(ConfigError, match="channel criteria have none"):
        driver.begin(model, [(MLP.example(), torch.zeros(3).long())], total_steps=1, epochs=1)


def test_block_pruner_steps_every_optimiser_step_and_detaches_at_the_end(tmp_path):
    model, driver, x, y = _blocks("movement", 0.0)
    driver.export_path = tmp_path / "t.sparta"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(4):
        default_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        assert driver.after_optimizer_step(lambda: [])
        assert not driver.after_epoch(lambda: [])  # blocks ignore epochs
    assert driver.pruner.done and driver.metrics()["sparta/density"] <= 0.5 + 1e-9
    task = driver.finish()
    assert (tmp_path / "t.sparta").exists() and task is not None
    compact = sparta.build(_plain(), task)  # the same base: seed 0, as _blocks made it
    with torch.no_grad():
        assert torch.allclose(compact(x), model.eval()(x), atol=1e-5)


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def test_a_state_the_callbacks_did_not_write_is_refused():
    with pytest.raises(ConfigError, match=r"not a sparta callback state.*got \['epoch'\]"):
        PruningDriver().load_state_dict({"epoch": 3})
    blocks = _blocks("movement", 0.0)[1].state_dict()
    model = sparta.wrap(MLP(), "splora", rank=2)
    driver = PruningDriver(pruner_options={"criterion": "l1"})
    driver.load_state_dict(blocks)
    with pytest.raises(ConfigError, match="holds a blocks pruner's state but this run prunes chan"):
        driver.begin(model, [(MLP.example(), torch.zeros(3).long())], total_steps=4, epochs=1)


def test_state_round_trip_continues_the_channel_schedule():
    """A driver given another's state (on a model holding that one's masks) steps where the
    other would have, and prunes to the same levels of the original channel count."""
    x, y = MLP.example(4), torch.randint(0, 4, (4,))

    def driver_on():
        options = {"criterion": "l1", "target": 0.25, "steps": 3}
        return PruningDriver(pruner_options=options, unit="steps", every=2, start=2)

    first_model = sparta.wrap(_plain(), "splora", rank=2)
    first = driver_on()
    first.begin(first_model, [(x, y)], total_steps=8, epochs=1)
    for _ in range(3):  # one pruning step (after step 2), one step of recovery
        first.after_optimizer_step(lambda: [(x, y)])
    second_model = sparta.wrap(_plain(), "splora", rank=2)
    second = driver_on()
    second.prepare(second_model)  # as the callbacks do first: a state with masks now loads
    second_model.load_state_dict(first_model.state_dict())
    second.load_state_dict(first.state_dict())
    second.begin(second_model, [(x, y)], total_steps=8, epochs=1)
    stepped = [second.after_optimizer_step(lambda: [(x, y)]) for _ in range(5)]
    assert stepped == [True, False, True, False, False]  # after steps 4 and 6, as planned
    assert [r.step for r in second.pruner.history] == [1, 2, 3]
    assert second.pruner.achieved()["density"] == pytest.approx(0.25, abs=0.1)


@pytest.mark.parametrize(
    ("problem", "labels"),
    [
        ("single_label_classification", lambda n: torch.tensor([0, 2, 1, 2])),
        ("regression", lambda n: torch.tensor([0.5, -1.0, 2.0, 0.0])),
        (
            "multi_label_classification",
            lambda n: (torch.arange(4 * n).reshape(4, n) % 3 == 0).float(),
        ),
    ],
)
def test_default_loss_is_the_loss_hugging_face_models_choose(problem, labels):
    """Regression and multi-label classifiers failed in scoring ("expected target dtype to be
    Long"): the default loss follows the targets' kind as the models' own loss does."""
    transformers = pytest.importorskip("transformers")
    n = 1 if problem == "regression" else 3
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=n, problem_type=problem,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids, targets = torch.randint(0, 30, (4, 6)), labels(n)
    with torch.no_grad():
        out = model(input_ids=ids, labels=targets)
    assert float(default_loss(out.logits, targets)) == pytest.approx(float(out.loss), rel=1e-6)


def test_default_loss_refuses_targets_it_cannot_read():
    with pytest.raises(ConfigError, match=r"got outputs \(4, 3\) and torch.float32 targets \(4,\)"):
        default_loss(torch.randn(4, 3), torch.randn(4))
