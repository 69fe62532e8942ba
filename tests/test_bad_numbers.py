"""Bad numbers stop, not prune (issue #11).

NaN/inf losses, gradients, weights and scores raise ``NonFiniteError`` naming the criterion,
the layers and the count of bad values, before any mask changes, for every registered channel
and block criterion; absurd options are refused (or warned about, with the reachable level);
an empty example batch gets one clear error before the model runs; mistakes in what is passed
to ``score`` and ``step`` get a clear error instead of a raw one.
"""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sparta
from sparta import ConfigError, NonFiniteError
from sparta.pruning import BlockPruner, Pruner, list_block_criteria
from sparta.pruning.importance import get_criterion, list_criteria
from sparta.pruning.pruner import Target
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)
from tiny_models import MLP, ResidualNet, perturb

CRITERIA = list_criteria()
DATA_DRIVEN = [c for c in CRITERIA if get_criterion(c).data_driven]
# lrp starts relevance at the true class and never calls loss_fn (importance.LRP)
USES_LOSS = [c for c in DATA_DRIVEN if c != "lrp"]
BAD = [float("nan"), float("inf")]


# -- fixtures and helpers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparta.SkippedLayerWarning)
        model = sparta.wrap(ResidualNet(), "splora", rank=2)
    perturb(model)
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)


def _pruner(net, criterion="l1", **kw) -> Pruner:
    model, x, _ = net
    return Pruner(copy.deepcopy(model), x, criterion=criterion, target=kw.pop("target", 0.5), **kw)


def _masks(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "mask" in n}


def _assert_same(before: dict, model) -> None:
    after = _masks(model)
    assert after.keys() == before.keys() and before
    for name, mask in before.items():
        assert after[name].dtype == mask.dtype and torch.equal(after[name], mask), name


def _set(tensor: torch.Tensor, value: float) -> None:
    with torch.no_grad():
        tensor.view(-1)[0] = value


# -- channel criteria: bad losses, gradients, inputs, weights and scores -------------------------
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf"])
@pytest.mark.parametrize("criterion", USES_LOSS)
def test_a_nonfinite_loss_is_refused_and_not_counted(net, criterion, bad):
    _, x, y = net
    pruner = _pruner(net, criterion)
    before = _masks(pruner.model)
    calls = []

    def second_is_bad(out, t):  # the first batch is good, the second's loss is NaN/inf
        calls.append(1)
        return F.cross_entropy(out, t) * (bad if len(calls) > 1 else 1.0)

    word = "nan" if bad != bad else "inf"
    pattern = f"criterion '{criterion}': the loss of scoring batch 2 is {word}.*lower the learning"
    with pytest.raises(NonFiniteError, match=pattern):
        pruner.score([(x, y), (x, y)], second_is_bad)
    assert pruner.criterion.batches == 1  # the good batch counts, the bad one does not
    with pytest.raises(NonFiniteError, match="loss of scoring batch 2"):
        pruner.score([(x, y)], second_is_bad)
    _assert_same(before, pruner.model)
    # the scores are those of the good batch alone, so pruning can go on
    clean = _pruner(net, criterion)
    clean.score([(x, y)], F.cross_entropy)
    for name, s in pruner.importance().items():
        torch.testing.assert_close(s, clean.importance()[name], rtol=0, atol=0)
    assert pruner.step().pruned == clean.step().pruned


@pytest.mark.parametrize("criterion", USES_LOSS)
def test_nonfinite_gradients_of_a_finite_loss_are_refused(net, criterion):
    _, x, y = net
    pruner = _pruner(net, criterion)
    before = _masks(pruner.model)

    def sqrt_at_zero(out, t):  # value 0, gradient inf * 0 = NaN at every output
        return (out - out.detach()).abs().sqrt().sum()

    with pytest.raises(
        NonFiniteError,
        match=rf"criterion '{criterion}': the activations or gradients of scoring batch 1 hold "
        r"non-finite values: '\w+' \(\d+ NaN of \d+\)",
    ):
        pruner.score([(x, y)], sqrt_at_zero)
    assert pruner.criterion.batches == 0
    _assert_same(before, pruner.model)


@pytest.mark.parametrize("criterion", DATA_DRIVEN)
def test_nan_in_the_scoring_data_is_refused(net, criterion):
    _, x, y = net
    pruner = _pruner(net, criterion)
    before = _masks(pruner.model)
    bad_x = x.clone()
    bad_x[1, 0, 2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=f"criterion '{criterion}'.*scoring batch 1"):
        pruner.score([(bad_x, y)], F.cross_entropy)
    assert pruner.criterion.batches == 0
    with pytest.raises(ConfigError, match="has seen no batch"):
        pruner.step()
    _assert_same(before, pruner.model)
    assert pruner.history == []


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["branch.adapter.B", "mix.base.weight"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_a_nonfinite_weight_is_refused_naming_it(net, criterion, where, bad):
    _, x, y = net
    pruner = _pruner(net, criterion)
    _set(pruner.model.get_parameter(where), bad)
    before = _masks(pruner.model)
    kind = "NaN" if bad != bad else "inf"
    pattern = rf"criterion '{criterion}': the weights .* {re.escape(where)} \(1 {kind} of \d+\)"
    if pruner.criterion_cls.data_driven:
        with pytest.raises(NonFiniteError, match=pattern):
            pruner.score([(x, y)], F.cross_entropy)
    with pytest.raises(NonFiniteError, match=pattern + r"\. No mask was changed"):
        pruner.step()
    _assert_same(before, pruner.model)
    assert pruner.history == [] and not pruner.done


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_nonfinite_scores_passed_to_step_are_refused(net, criterion, bad):
    _, x, y = net
    pruner = _pruner(net, criterion)
    source = _pruner(net, "l1").importance()  # e.g. scores summed over the ranks of a DDP run
    name = sorted(source)[1]
    scores = {k: v.clone() for k, v in source.items()}
    scores[name][[0, 2]] = bad
    before = _masks(pruner.model)
    kind = "NaN" if bad != bad else "inf"
    with pytest.raises(
        NonFiniteError,
        match=rf"the scores passed to step\(\) hold non-finite values: group '{name}' "
        rf"\(2 {kind} of {len(source[name])}\)\. No mask was changed",
    ):
        pruner.step(scores)
    _assert_same(before, pruner.model)
    assert pruner.history == []
    assert pruner.step(source).pruned  # the same step with good scores prunes


def test_nonfinite_scores_from_the_criterion_are_refused(net, monkeypatch):
    pruner = _pruner(net, "random")
    scores = pruner.importance()
    name = next(iter(scores))
    scores[name][-1] = float("inf")
    monkeypatch.setattr(pruner.criterion, "scores", lambda: scores)
    before = _masks(pruner.model)
    with pytest.raises(
        NonFiniteError, match=rf"criterion 'random': scores hold .*'{name}' \(1 inf of"
    ):
        pruner.step()
    _assert_same(before, pruner.model)


# -- block criteria ------------------------------------------------------------------------------
def _block_model(seed: int = 0):
    torch.manual_seed(seed)
    return sparta.wrap(MLP(), "splopa", block=4, prototypes=2).train()


def _train_step(model, x, y, scale: float = 1.0, update: bool = True) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    (F.cross_entropy(model(x), y) * scale).backward()
    if update:
        torch.optim.SGD(params, lr=0.1).step()
    for p in params:
        p.grad = None


def _block_masks(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "mask" in n}


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf"])
@pytest.mark.parametrize("criterion", list_block_criteria())
def test_block_step_after_a_nonfinite_loss_is_refused(criterion, bad):
    model, x, y = _block_model(), torch.randn(6, 12), torch.randint(0, 4, (6,))
    pruner = BlockPruner(model, criterion, target=0.5, total_steps=3)
    _train_step(model, x, y)
    pruner.step()  # a good step prunes
    _train_step(model, x, y, scale=bad)  # the optimiser step spreads the NaN/inf into weights
    before = _masks(model)
    with pytest.raises(
        NonFiniteError, match=f"(?i)block criterion '{criterion}'.*no mask was changed"
    ):
        pruner.step()
    _assert_same(before, model)
    assert pruner.steps_done == 1 and len(pruner.history) == 1


@pytest.mark.parametrize("criterion", list_block_criteria())
def test_a_nonfinite_block_weight_is_refused_naming_it(criterion):
    model = _block_model()
    pruner = BlockPruner(model, criterion, target=0.5, total_steps=2)
    _set(model.body[3].base.weight, float("nan"))
    before = _masks(model)
    with pytest.raises(
        NonFiniteError,
        match=rf"block criterion '{criterion}': the weights of the pruned layers hold "
        r"non-finite values: body\.3\.base\.weight \(1 NaN of 256\)",
    ):
        pruner.step()
    _assert_same(before, model)
    assert pruner.steps_done == 0


@pytest.mark.parametrize("criterion", list_block_criteria())
def test_a_refused_block_step_drops_the_bad_values_and_can_be_skipped(criterion):
    """What the hooks met (gradients, gate gradients, inputs) is dropped, not added up: a caller
    that catches the error and skips the batch (as a GradScaler skips an overflowed step)
    goes on with finite scores."""
    model, x, y = _block_model(), torch.randn(6, 12), torch.randint(0, 4, (6,))
    pruner = BlockPruner(model, criterion, target=0.5, total_steps=2)
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    _train_step(model, bad_x, y, update=False)
    before = _masks(model)
    if criterion == "magnitude":  # reads weights only: nothing it reads is bad
        pruner.step()
        return
    with pytest.raises(NonFiniteError, match=f"block criterion '{criterion}'"):
        pruner.step()
    _assert_same(before, model)
    assert bool(torch.isfinite(pruner.criterion.scores()).all())
    _train_step(model, x, y, update=False)
    record = pruner.step()
    assert record.step == 1 and record.pruned > 0


@pytest.mark.parametrize(
    "criterion,options,match",
    [
        ("soft-movement", {"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        ("soft-movement", {"lr": -1e-3}, "lr must be a finite number > 0"),
        ("soft-movement", {"init": float("inf")}, "init must be a finite number, got inf"),
        ("soft-movement", {"threshold": "0"}, "threshold must be a finite number"),
        ("l0", {"beta": 0.0}, "beta must be a finite number > 0"),
        ("l0", {"lr": True}, "lr must be a finite number > 0, got True"),
    ],
)
def test_absurd_block_criterion_options_are_refused(criterion, options, match):
    with pytest.raises(ConfigError, match=f"block criterion '{criterion}': {match}"):
        BlockPruner(_block_model(), criterion, **options)


# -- absurd options ------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.5, 1e30, 1e300, float("inf"), float("nan"), -1e-4])
@pytest.mark.parametrize("adapter", sparta.list_adapters())
def test_init_scale_outside_0_1_is_refused(adapter, scale):
    cls = sparta.get_adapter(adapter)
    pattern = re.escape("init_scale must be a number in [0, 1]") + f".*got {re.escape(repr(scale))}"
    with pytest.raises(ConfigError, match=pattern):
        cls.resolve_options({"init_scale": scale})
    assert cls.resolve_options({"init_scale": 1.0})["init_scale"] == 1.0


def test_wrap_with_a_huge_init_scale_is_refused_not_nan():
    with pytest.raises(ConfigError, match=r"init_scale .* got 1e\+30"):
        sparta.wrap(MLP(), "splora", rank=2, init_scale=1e30)


def test_min_channels_above_every_group_is_refused_naming_the_widest(net):
    # ResidualNet's widest group is 'mix' with 10 filters
    with pytest.raises(
        ConfigError,
        match=r"min_channels=1000000 leaves nothing to prune: .*the widest, 'mix', has 10\); "
        r"choose min_channels < 10",
    ):
        _pruner(net, min_channels=10**6)
    with pytest.raises(ConfigError, match="min_channels=10 leaves nothing to prune"):
        _pruner(net, min_channels=10)
    with pytest.raises(ConfigError, match="round_to=64 leaves nothing to prune"):
        _pruner(net, round_to=64)


def test_an_unreachable_target_warns_with_the_level_that_is_reached(net):
    with pytest.warns(UserWarning, match="cannot be reached") as caught:
        pruner = _pruner(net, min_channels=9, target=0.5)
    reach = float(re.search(r"lowest reachable density is ([\d.]+)", str(caught[0].message))[1])
    assert "min_channels=9" in str(caught[0].message)
    assert pruner.step().achieved["density"] == pytest.approx(reach, abs=1e-4)
    with pytest.warns(UserWarning, match=r"highest reachable sparsity is 0\.\d+"):
        _pruner(net, min_channels=9, target="sparsity=0.9")


def test_a_reachable_target_does_not_warn(net, recwarn):
    _pruner(net, min_channels=2, target=0.5)
    assert not [w for w in recwarn if "cannot be reached" in str(w.message)]


def test_more_steps_than_prunable_units_warn_and_cost_nothing_up_front(net):
    units = sum(g.size - 1 for g in _pruner(net).groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning up to one unit per step
        assert len(_pruner(net, steps=units).levels) == units
    for target in (0.5, 1.0):  # a schedule of 1e9 levels is read step by step, never built
        with pytest.warns(
            UserWarning,
            match=f"steps=1000000000 is more than the {units} units .* at least "
            f"{10**9 - units} steps will prune nothing",
        ):
            pruner = _pruner(net, steps=10**9, target=target)
        assert len(pruner.levels) == 10**9 and pruner.levels[-1] == target
        assert pruner.step().level == pytest.approx(1 - (1 - target) / 10**9)


def test_a_schedule_that_grows_is_refused_when_its_level_is_read():
    from sparta.pruning.schedules import Levels

    def bump(step, steps, final):  # down, then up at step 20,001
        return 0.9 if step == 20_001 else 0.5

    levels = Levels(bump, 10**6, 0.5)  # beyond 10,000 steps only the ends are read up front
    assert levels[0] == 0.5
    with pytest.raises(ConfigError, match="must decrease monotonically to 0.5"):
        levels[20_000]
    with pytest.raises(ConfigError, match="must decrease monotonically"):
        Levels(bump, 30_000, 0.5)[20_000]
    with pytest.raises(ConfigError, match="must decrease monotonically"):
        Levels(lambda k, n, f: 0.9 if k == 20 else 0.5, 100, 0.5)  # read whole up to 10,000


@pytest.mark.parametrize("ignored", [5, ["fc", 3], [None]])
def test_ignored_of_the_wrong_type(net, ignored):
    with pytest.raises(ConfigError, match="ignored must be a module name or a list"):
        _pruner(net, ignored=ignored)


def test_targets_given_as_numpy_or_torch_scalars(net):
    assert Target.parse(np.float32(0.25)) == Target("density", 0.25)
    assert Target.parse(torch.tensor(0.5).item()).value == 0.5
    with pytest.raises(ConfigError, match="density target must be a number"):
        Target.parse([0.5])


@pytest.mark.parametrize("criterion,options", [("lrp", {"epsilon": float("inf")})])
def test_absurd_criterion_options_are_refused_before_tracing(net, criterion, options):
    with pytest.raises(ConfigError, match="epsilon must be a finite number > 0, got inf"):
        _pruner(net, criterion, **options)


# -- empty batches -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "inputs,shown",
    [
        (torch.randn(0, 3, 8, 8), r"of shape \(0, 3, 8, 8\)"),
        ((torch.randn(2, 3, 0, 8),), r"\(of shape \(2, 3, 0, 8\)\)"),
        ({"x": torch.randn(0, 3, 8, 8)}, r"\{x: of shape \(0, 3, 8, 8\)\}"),
    ],
)
def test_a_batch_of_zero_is_refused_before_the_model_runs(net, inputs, shown):
    model = copy.deepcopy(net[0])
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(
        ConfigError, match=f"example_inputs {shown} hold a tensor with a zero-sized dimension"
    ):
        Pruner(model, inputs)
    assert calls == []


@pytest.mark.parametrize("criterion", CRITERIA)
def test_an_empty_scoring_batch_is_refused(net, criterion):
    _, x, y = net
    pruner = _pruner(net, criterion)
    if not pruner.criterion_cls.data_driven:
        pruner.score([(x[:0], y[:0])], F.cross_entropy)  # weight criteria read no data
        return
    with pytest.raises(
        ConfigError, match=r"the inputs of scoring batch 1 of shape \(0, 3, 8, 8\) hold"
    ):
        pruner.score([(x[:0], y[:0])], F.cross_entropy)


# -- what is passed to score() and step(): clear errors, not raw ones ------------------------------
def test_no_scoring_batch_at_all_is_said_at_the_step(net):
    pruner = _pruner(net, "taylor")
    before = _masks(pruner.model)
    assert pruner.score([], F.cross_entropy) == 0  # a DDP rank may get no batch
    with pytest.raises(ConfigError, match=r"has seen no batch: call Pruner\.score"):
        pruner.step()
    _assert_same(before, pruner.model)


@pytest.mark.parametrize(
    "batches,loss_fn,match",
    [
        ("pairs", 5, "loss_fn must be a function .* got int"),
        (7, F.cross_entropy, "batches must be an iterable of .* got int"),
        ("tensor", F.cross_entropy, "batches must be an iterable of .* got Tensor"),
        ("one pair", F.cross_entropy, r"got Tensor; .* for one batch, pass \[\(inputs, targets\)\]"),
        ("pairs", lambda o, t: F.cross_entropy(o, t, reduction="none"),
         r"loss_fn must return a scalar tensor, got a tensor of shape \(4,\) on scoring batch 1"),
        ("pairs", lambda o, t: float(F.cross_entropy(o, t).detach()), "scalar tensor, got float"),
        ("pairs", lambda o, t: F.cross_entropy(o, t).detach(),
         "does not depend on the model's outputs"),
        ("bad targets", F.cross_entropy,
         r"loss_fn failed on scoring batch 1 \(outputs of shape \(4, 5\), targets of shape "
         r"\(4,\)\): IndexError"),
        ("bad inputs", F.cross_entropy,
         r"the model failed on scoring batch 1 \(inputs of shape \(4, 5, 8, 8\)\): RuntimeError"),
    ],
)  # fmt: skip
def test_bad_batches_and_losses_get_a_clear_error(net, batches, loss_fn, match):
    _, x, y = net
    batches = {
        "pairs": [(x, y)],
        "tensor": x,
        "one pair": (x, y),
        "bad targets": [(x, y + 99)],
        "bad inputs": [(torch.randn(4, 5, 8, 8), y)],
    }.get(batches, batches)
    for criterion in USES_LOSS:
        pruner = _pruner(net, criterion)
        with pytest.raises(ConfigError, match=match):
            pruner.score(batches, loss_fn)
        assert pruner.criterion.batches == 0


def test_lrp_refuses_inputs_the_model_cannot_take(net):
    _, _, y = net
    with pytest.raises(ConfigError, match=r"the model failed on scoring batch 1 \(inputs of"):
        _pruner(net, "lrp").score([(torch.randn(4, 5, 8, 8), y)], F.cross_entropy)


@pytest.mark.parametrize(
    "scores,match",
    [
        ("a list", "scores must be a dict {group name: one score per unit}, got list"),
        ("first group strings", r"scores\['\w+'\] must be numbers, one per unit, got str"),
        ("missing group", r"got \d+ entries \('\w+': expected \d+, got none\)"),
        ("extra group", r"\('nope': expected no entry, got \(3,\)\)"),
        ("short group", r"'\w+': expected (\d+), got \(\d+,\)"),
    ],
)
def test_bad_scores_passed_to_step_get_a_clear_error(net, scores, match):
    pruner = _pruner(net)
    good = pruner.importance()
    first = next(iter(good))
    scores = {
        "first group strings": {**good, first: "high"},
        "missing group": {k: v for k, v in good.items() if k != first},
        "extra group": {**good, "nope": torch.ones(3)},
        "short group": {**good, first: good[first][:-1]},
        "a list": [1.0, 2.0],
    }[scores]
    before = _masks(pruner.model)
    with pytest.raises(ConfigError, match=match):
        pruner.step(scores)
    _assert_same(before, pruner.model)


def test_progress_that_is_not_a_function(net):
    _, x, y = net
    with pytest.raises(ConfigError, match="progress must be a function"):
        _pruner(net, "taylor").score([(x, y)], F.cross_entropy, progress=3)


@pytest.mark.parametrize("value", [float("nan"), 1.5, -0.1, "0.5", None])
def test_a_schedule_returning_a_bad_level_is_refused(net, value):
    def schedule(step, steps, final):
        return value if step == 2 else 1.0 - (1.0 - final) * step / steps

    with pytest.raises(
        ConfigError, match=r"schedule .* must return a level in \[0, 1\] .* at step 2 of 3"
    ):
        _pruner(net, steps=3, schedule=schedule)
    # a block schedule is read step by step: the bad level is refused at its step, masks as before
    model = _block_model()
    pruner = BlockPruner(model, "magnitude", total_steps=4, warmup_steps=1, schedule=schedule)
    pruner.step(), pruner.step()  # warm-up, then schedule step 1 of 3
    before = _masks(model)
    with pytest.raises(ConfigError, match=r"at step 2 of 3"):
        pruner.step()
    _assert_same(before, model)
    assert pruner.steps_done == 2


def test_a_block_target_below_one_unit_per_layer_warns_with_the_level_reached():
    model = _block_model()
    blocks = sum(m.mask_block.numel() for m in model.modules() if hasattr(m, "mask_block"))
    with pytest.warns(UserWarning, match=rf"which leaves {2 / blocks:.4f} of the blocks"):
        pruner = BlockPruner(model, "magnitude", target=0.01, total_steps=1)
    assert pruner.step().density == pytest.approx(2 / blocks)  # one block in each of 2 layers
    assert BlockPruner(_block_model(), "magnitude", target=np.float32(0.5)).target == 0.5


@pytest.mark.parametrize("granularity", [5, None, ["heads", 3], [["heads"]], ()])
def test_block_granularity_of_the_wrong_type(granularity):
    with pytest.raises(ConfigError, match="granularity must be 'blocks', 'heads', 'neurons'"):
        BlockPruner(_block_model(), granularity=granularity)


def test_mac_counter_refuses_a_batch_of_zero(net):
    with pytest.raises(ConfigError, match=r"example_inputs of shape \(0, 3, 8, 8\) hold"):
        sparta.MacCounter(net[0], torch.randn(0, 3, 8, 8))
    assert sparta.MacCounter(net[0], net[1]).count(net[0]) > 0


def test_build_and_report_refuse_a_batch_of_zero(net):
    base, x = ResidualNet().eval(), net[1]
    model = sparta.wrap(base, rank=2)
    Pruner(model, x, target="density=0.5").step()
    task = sparta.export(model)
    for fn in (sparta.build, sparta.report):
        with pytest.raises(ConfigError, match=r"of shape \(0, 3, 8, 8\) hold a tensor with a zero"):
            fn(base, task, example_inputs=x[:0])
