"""The paper's recipe as a named preset of the runner (issue #12, item 4): preset values and
overrides, the step schedule, the adapter learning-rate multiplier, the validation split carved
from the training data, steps from the 5%-of-filters rule, both parameter counts in every
evaluation record, and resumption with the new fields."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from typer.testing import CliRunner

import sparta
from sparta.adapters import get_adapter, list_adapters
from sparta.adapters.base import Adapter
from sparta.cli import app
from sparta.cli.runs import parse_args
from sparta.config import GridConfig, RunConfig, load_config, resolve_config, save_config
from sparta.errors import ConfigError, UnknownNameError
from sparta.train import (
    CHECKPOINT,
    RESULT,
    DistState,
    build_model,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    param_groups,
    recipes,
    run,
    save_checkpoint,
)
from sparta.train import runner as runner_module
from test_train import one_thread, small_config, tiny_cnn, tiny_data  # noqa: F401


class Stop(Exception):
    pass


# -- the preset --------------------------------------------------------------------------------
def test_paper_preset_values():
    c = RunConfig.from_recipe("paper")
    assert (c.recipe, c.optimizer, c.momentum, c.weight_decay) == ("paper", "sgd", 0.9, 5e-4)
    assert (c.lr, c.lr_schedule, c.adapter_lr_scale, c.init_scale) == (0.003, "step", 10.0, 1e-4)
    assert (c.ranking, c.schedule, c.step_fraction) == ("global", "linear", 0.05)
    assert (c.recovery_epochs, c.val_fraction) == (1, 0.1)
    assert c.steps == 19  # default target: 5% of the filters kept, 19 steps of 5%
    assert "paper" in recipes() and recipes()["paper"].values["lr_schedule"] == "step"
    # every value carries its reason
    assert all(why for _, why in recipes()["paper"].choices.values())
    # the defaults without a recipe are unchanged
    d = RunConfig()
    assert (d.recipe, d.lr_schedule, d.adapter_lr_scale, d.val_fraction) == (None, "cosine", 1, 0)
    assert (d.steps, d.step_fraction, d.init_scale) == (19, None, None)


@pytest.mark.parametrize(("target", "steps"), [(0.3, 14), (0.1, 18), (0.5, 10), (0.96, 1)])
def test_steps_follow_the_five_percent_of_filters_rule(target, steps):
    c = RunConfig.from_recipe("paper", target=target)
    assert c.steps == steps
    # a sparsity target: its kept fraction of weights stands in for the density
    assert RunConfig.from_recipe("paper", target="sparsity=0.75").steps == 15


def test_explicit_steps_win_and_replace_rederives():
    c = RunConfig.from_recipe("paper", target=0.3, steps=3)
    assert (c.steps, c.step_fraction) == (3, None)
    derived = RunConfig.from_recipe("paper", target=0.3)
    assert derived.replace(target=0.1).steps == 18  # a new target, new steps
    fixed = derived.replace(steps=4)
    assert fixed.steps == 4 and fixed.replace(target=0.1).steps == 4
    assert RunConfig.from_dict(derived.to_dict()) == derived  # round trip


def test_overrides_win_over_the_recipe():
    c = RunConfig.from_recipe("paper", lr=0.2, optimizer="adam", val_fraction=0.0, epochs=3)
    assert (c.lr, c.optimizer, c.val_fraction, c.epochs) == (0.2, "adam", 0.0, 3)
    assert (c.momentum, c.lr_schedule) == (0.9, "step")  # the rest of the preset stays
    assert RunConfig.from_dict({"recipe": "paper", "lr": 0.3}).lr == 0.3
    # replace with a new recipe applies the preset over the current values
    r = RunConfig(lr=0.5, epochs=2).replace(recipe="paper", epochs=7)
    assert (r.lr, r.lr_schedule, r.epochs) == (0.003, "step", 7)


def test_unknown_recipe_lists_the_known_ones():
    for make in (
        lambda: RunConfig.from_recipe("papr"),
        lambda: RunConfig.from_dict({"recipe": "papr"}),
        lambda: RunConfig(recipe="papr"),
    ):
        with pytest.raises(UnknownNameError, match=r"unknown recipe 'papr'.*paper"):
            make()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("val_fraction", 1.0, r"val_fraction must be in \[0, 1\)"),
        ("val_fraction", -0.1, "val_fraction"),
        ("adapter_lr_scale", 0.0, "adapter_lr_scale must be > 0"),
        ("lr_schedule", "steps", "unknown lr_schedule 'steps'"),
        ("init_scale", 2.0, "init_scale"),
    ],
)
def test_new_fields_are_validated(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**{key: value})


def test_recipe_in_yaml_and_toml_files(tmp_path):
    (tmp_path / "a.yaml").write_text("recipe: paper\nlr: 0.05\ntarget: 0.1\n")
    (tmp_path / "a.toml").write_text('recipe = "paper"\nlr = 0.05\ntarget = 0.1\n')
    for name in ("a.yaml", "a.toml"):
        c = load_config(tmp_path / name)
        assert (c.recipe, c.lr, c.lr_schedule, c.steps, c.val_fraction) == (
            "paper", 0.05, "step", 18, 0.1,
        )  # fmt: skip
    c = load_config(tmp_path / "a.yaml")
    assert load_config(save_config(c, tmp_path / "b.yaml")) == c
    assert load_config(save_config(c, tmp_path / "b.toml")) == c


def test_grid_with_the_recipe_derives_steps_per_density(tmp_path):
    (tmp_path / "g.yaml").write_text(
        "recipe: paper\nmethods: [fine-pruning, splora]\ndensities: [0.3, 0.1]\n"
    )
    grid = load_config(tmp_path / "g.yaml")
    assert isinstance(grid, GridConfig)
    steps = {(r.method, r.target): r.steps for r in grid.runs()}
    assert steps == {
        ("fine-pruning", 0.3): 14, ("fine-pruning", 0.1): 18,
        ("splora", 0.3): 14, ("splora", 0.1): 18,
    }  # fmt: skip
    # the same budget for every method: only method (and the name) differ between methods
    runs = {(r.method, r.target): r.to_dict() for r in grid.runs()}
    a, b = runs[("fine-pruning", 0.1)], runs[("splora", 0.1)]
    assert {k for k in a if a[k] != b[k]} == {"method", "output_dir"}


def test_cli_recipe_flag_and_file(tmp_path):
    path, overrides, grid = parse_args(["--recipe", "paper", "--lr", "0.2", "--target", "0.3"])
    c = resolve_config(path, overrides, grid)
    assert (c.recipe, c.lr, c.lr_schedule, c.steps) == ("paper", 0.2, "step", 14)
    # recipe first, then the file's keys, then the other flags
    (tmp_path / "c.yaml").write_text("lr: 0.3\nepochs: 2\n")
    c = resolve_config(
        *parse_args([str(tmp_path / "c.yaml"), "--recipe", "paper", "--epochs", "5"])
    )
    assert (c.lr, c.epochs, c.optimizer, c.weight_decay) == (0.3, 5, "sgd", 5e-4)
    c = resolve_config(*parse_args(["--recipe", "paper", "--steps", "2"]))
    assert (c.steps, c.step_fraction) == (2, None)
    result = CliRunner().invoke(app, ["run", "--recipe", "nope"])
    assert result.exit_code == 2 and "unknown recipe 'nope'" in result.output
    help_text = CliRunner().invoke(app, ["run", "--help"]).output
    assert "FILTER density" in help_text and "--recipe" in help_text


# -- optimisation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("total", "factors"),
    [
        (8, [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]),  # milestones at 4 and 6
        (4, [1, 1, 0.1, 0.01]),
        (3, [1, 0.1, 0.01]),  # floor(1.5) = 1, floor(2.25) = 2
        (1, [1]),
    ],
)
def test_step_schedule_divides_by_ten_at_half_and_three_quarters(total, factors):
    p = nn.Parameter(torch.zeros(2))
    opt = make_optimizer([p], "sgd", 0.5)
    sched = make_scheduler(opt, "step", total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5 * f for f in factors])


def _wrapped():
    return sparta.wrap(tiny_cnn(), "splora", rank=2)


def test_adapter_lr_scale_touches_adapter_parameters_only():
    model = _wrapped()
    groups = {g["name"]: g for g in param_groups(model, 0.01, adapter_lr_scale=10)}
    adapter_ids = {id(p) for m in model.modules() if isinstance(m, Adapter) for p in m.parameters()}
    assert {id(p) for p in groups["adapter"]["params"]} == adapter_ids and adapter_ids
    assert groups["adapter"]["lr"] == pytest.approx(0.1)
    assert groups["other"]["lr"] == 0.01
    other = {id(p) for p in groups["other"]["params"]}
    head, norm = model[-1], model[1]
    for p in (head.weight, head.bias, norm.weight, norm.bias):
        assert id(p) in other  # the head, norms and biases keep lr
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert other | adapter_ids == trainable and not other & adapter_ids
    # scale 1, or a model without adapters: one group at lr
    assert [g["lr"] for g in param_groups(model, 0.01)] == [0.01]
    assert [g["lr"] for g in param_groups(tiny_cnn(), 0.01, 10)] == [0.01]


def test_the_runner_gives_adapters_the_scaled_rate(tmp_path):
    seen = []

    def grab(n, path):
        seen.append(load_checkpoint(path)["optimizer"]["param_groups"])

    cfg = small_config(tmp_path, optimizer="sgd", lr=0.02, adapter_lr_scale=5, steps=1)
    run(cfg, tiny_cnn(), tiny_data(), progress=False, on_checkpoint=grab)
    groups = {g["name"]: g for g in seen[0]}
    assert groups["adapter"]["initial_lr"] == pytest.approx(0.1)
    assert groups["other"]["initial_lr"] == pytest.approx(0.02)


@pytest.mark.parametrize("name", [n for n in list_adapters() if "init_scale" in
                                  get_adapter(n).option_names()])  # fmt: skip
def test_init_scale_reaches_every_adapter_that_takes_it(name):
    """The smallest max-abs over an adapter's parameter tensors is its uniform(+-init_scale)
    initialisation: 3e-3 given, against 1e-4 by default."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 3),
    )  # fmt: skip
    data = SimpleNamespace(num_classes=3)

    def smallest(config):
        with pytest.warns(UserWarning) if name != "splora" else _nothing():
            built = build_model(config, model, data, DistState())
        tensors = [p for m in built.modules() if isinstance(m, Adapter) for p in m.parameters()]
        return min(float(t.detach().abs().max()) for t in tensors)

    assert 1.5e-3 < smallest(RunConfig(method=name, init_scale=3e-3)) <= 3e-3
    assert smallest(RunConfig(method=name)) <= 1e-4
    assert 0.5e-4 < smallest(RunConfig.from_recipe("paper", method=name)) <= 1e-4


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- the validation split ----------------------------------------------------------------------
class Spy(Dataset):
    """A dataset that logs every index read, with the phase the runner is in."""

    def __init__(self, base: TensorDataset, log: list, tag: str, phase: list):
        self.base, self.log, self.tag, self.phase = base, log, tag, phase
        self.targets = base.tensors[-1]  # labels readable without loading: stratified split

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.log.append((self.phase[0], self.tag, int(i)))
        return self.base[i]


def test_validation_split_is_carved_from_training_data_only(tmp_path, monkeypatch):
    from sparta.data import split_validation

    log, phase = [], ["other"]
    data = tiny_data(n_train=80)
    spied = SimpleNamespace(
        train=Spy(data.train, log, "train", phase),
        test=Spy(data.test, log, "test", phase),
        num_classes=3,
    )

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            phase[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = "other"

        return wrapped

    monkeypatch.setattr(
        runner_module, "train_one_epoch", in_phase("train", runner_module.train_one_epoch)
    )
    monkeypatch.setattr(runner_module, "evaluate", in_phase("eval", runner_module.evaluate))
    cfg = small_config(tmp_path, val_fraction=0.25, seed=3)
    result = run(cfg, tiny_cnn(), spied, progress=False)

    train_part, val_part = split_validation(spied.train, 0.25, 3)
    val = set(val_part.indices)
    assert len(val) == 20 and not val & set(train_part.indices)
    # stratified: the held-out classes follow the training set's proportions
    labels = data.train.tensors[1]
    for c in range(3):
        share = float((labels == c).float().mean())
        assert abs(float((labels[list(val)] == c).float().mean()) - share) <= 1 / 20 + 1e-9
    read = lambda ph, tag: {i for p, t, i in log if p == ph and t == tag}  # noqa: E731
    # training and scoring read the training part only; evaluation reads the held-out part and
    # the test set; the test set is never read outside evaluation
    assert read("train", "train") <= set(train_part.indices)
    assert read("other", "train") <= set(train_part.indices)  # scoring, example inputs
    assert read("eval", "train") == val
    assert read("eval", "test") == set(range(24))
    assert not read("train", "test") and not read("other", "test")
    # seeded: the same seed gives the same split, another seed another
    assert split_validation(spied.train, 0.25, 3)[1].indices == val_part.indices
    assert split_validation(spied.train, 0.25, 4)[1].indices != val_part.indices

    saved = json.loads((tmp_path / RESULT).read_text())
    assert saved["data"] == {"train": 60, "val": 20, "test": 24}
    for record in [*result.steps, result.final]:
        assert record["val_accuracy"] is not None and 0 <= record["val_accuracy"] <= 1
        assert (record["val_accuracy"] * 20) == pytest.approx(round(record["val_accuracy"] * 20))
        assert (record["accuracy"] * 24) == pytest.approx(round(record["accuracy"] * 24))


def test_without_a_split_val_accuracy_is_none(tmp_path):
    result = run(small_config(tmp_path, steps=1), tiny_cnn(), tiny_data(), progress=False)
    assert all(r["val_accuracy"] is None for r in result.steps)
    assert json.loads((tmp_path / RESULT).read_text())["data"]["val"] == 0


# -- records -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["splora", "fine-pruning"])
def test_records_carry_both_counts_density_and_recipe(tmp_path, method):
    cfg = RunConfig.from_recipe(
        "paper", method=method, rank=2, target=0.5, steps=2, epochs=2, batch_size=16,
        scoring_batches=2, val_fraction=0.25, output_dir=str(tmp_path), device="cpu",
    )  # fmt: skip
    result = run(cfg, tiny_cnn(), tiny_data(n_train=80), progress=False)
    keys = ("learned_parameters", "learned_parameters_paper", "density", "sparsity", "macs",
            "accuracy", "val_accuracy")  # fmt: skip
    for record in [*result.steps, result.final]:
        assert all(record[k] is not None for k in keys), record
    final = result.final
    assert final["learned_parameters"] == sparta.learned_parameters(result.model)
    assert final["learned_parameters_paper"] == sparta.learned_parameters(
        result.model, accounting="paper"
    )
    # pruned: the paper counts the whole head and every norm, the task file kept channels only
    assert final["density"] == pytest.approx(0.5, abs=0.1)
    assert final["learned_parameters_paper"] > final["learned_parameters"]
    unpruned = result.steps[0]
    assert unpruned["density"] == 1.0 and unpruned["sparsity"] == 0.0
    saved = json.loads((tmp_path / RESULT).read_text())
    assert saved["config"]["recipe"] == "paper"
    assert saved["recipe"]["name"] == "paper" and saved["recipe"]["values"]["step_fraction"] == 0.05


# -- resumption --------------------------------------------------------------------------------
def _recipe_config(out, **changes):
    base = small_config(out, recovery_epochs=2).to_dict()
    keep = {k: base[k] for k in ("method", "rank", "criterion", "batch_size", "scoring_batches",
                                 "output_dir", "device", "epochs", "recovery_epochs")}  # fmt: skip
    return RunConfig.from_recipe("paper", **keep, target=0.9, val_fraction=0.25, **changes)


def test_resume_with_the_recipe_and_a_split_matches_an_uninterrupted_run(tmp_path):
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "crashed"
    cfg = _recipe_config(ref_dir)
    assert cfg.steps == 2 and cfg.val_fraction == 0.25
    ref = run(cfg, tiny_cnn(), tiny_data(n_train=80), progress=False)

    def crash(n, path):
        if n == 4:  # inside the first recovery phase: optimiser groups and schedule resumed
            raise Stop

    with pytest.raises(Stop):
        run(_recipe_config(dir_), tiny_cnn(), tiny_data(n_train=80), progress=False,
            on_checkpoint=crash)  # fmt: skip
    resumed = run(_recipe_config(dir_), tiny_cnn(), tiny_data(n_train=80), progress=False,
                  resume=True)  # fmt: skip
    assert resumed.resumed
    a = json.loads((ref_dir / RESULT).read_text())
    b = json.loads((dir_ / RESULT).read_text())
    for key in ("steps", "pruning", "final", "data", "recipe"):
        assert a[key] == b[key], key
    state, ref_state = resumed.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def test_old_checkpoints_without_the_new_fields_resume(tmp_path):
    with pytest.raises(Stop):
        run(small_config(tmp_path), tiny_cnn(), tiny_data(), progress=False,
            on_checkpoint=lambda n, p: (_ for _ in ()).throw(Stop))  # fmt: skip
    state = load_checkpoint(tmp_path / CHECKPOINT)
    for key in ("recipe", "val_fraction", "adapter_lr_scale", "init_scale", "step_fraction"):
        del state["config"][key]  # as written before these fields existed
    for group in state["optimizer"]["param_groups"]:
        group.pop("name", None)
    del state["format"], state["version"]
    save_checkpoint(tmp_path / CHECKPOINT, state)
    resumed = run(small_config(tmp_path), tiny_cnn(), tiny_data(), progress=False, resume=True)
    assert resumed.resumed and len(resumed.steps) == 3
    # a change of recipe is a config change: refused
    with pytest.raises(Stop):
        run(small_config(tmp_path), tiny_cnn(), tiny_data(), progress=False,
            on_checkpoint=lambda n, p: (_ for _ in ()).throw(Stop))  # fmt: skip
    with pytest.raises(ConfigError, match="recipe: None -> 'paper'"):
        run(small_config(tmp_path, recipe="paper"), tiny_cnn(), tiny_data(), progress=False,
            resume=True)  # fmt: skip


def test_a_none_over_a_recipe_value_survives_a_file_round_trip(tmp_path):
    c = RunConfig.from_recipe("paper", init_scale=None)
    assert c.init_scale is None  # each adapter's own default
    assert load_config(save_config(c, tmp_path / "c.yaml")) == c
    assert load_config(save_config(c, tmp_path / "c.json")) == c
    with pytest.raises(ConfigError, match="save it as .yaml or .json"):
        save_config(c, tmp_path / "c.toml")
