"""``sparta.config``: validation messages, file round trips, grid expansion."""

from __future__ import annotations

import pytest

import sparta
from sparta.config import (
    GridConfig,
    RunConfig,
    load_config,
    methods,
    read_config_file,
    save_config,
)
from sparta.errors import ConfigError, UnknownNameError


def test_defaults_follow_the_paper():
    c = RunConfig()
    assert (c.method, c.rank, c.steps, c.target) == ("splora", 8, 19, 0.05)
    assert c.prunes and c.adapter == "splora"
    assert c.name == "splora-taylor-d0.05-s0"


@pytest.mark.parametrize(
    "key, hint", [("lr_shedule", "lr_schedule"), ("recovery_epoch", "recovery_epochs")]
)
def test_unknown_key_names_it_and_suggests_the_close_one(key, hint):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({key: 1})
    assert repr(key) in str(err.value) and f"did you mean {hint!r}" in str(err.value)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"lr": -0.1}, ["lr", "> 0", "-0.1"]),
        ({"momentum": 1.0}, ["momentum", "[0, 1)", "1.0"]),
        ({"epochs": -1}, ["epochs", ">= 0", "-1"]),
        ({"rank": 0}, ["rank", ">= 1", "0"]),
        ({"batch_size": 2.5}, ["batch_size", "integer", "2.5"]),
        ({"download": "yes"}, ["download", "true/false", "'yes'"]),
        ({"seed": True}, ["seed", "integer", "True"]),
        ({"target": 1.5}, ["density", "(0, 1]", "1.5"]),
        ({"target": "macs=2"}, ["macs", "(0, 1]", "2"]),
        ({"device": "gpu"}, ["device", "'gpu'"]),
        ({"weight_decay": float("nan")}, ["weight_decay", "finite", "nan"]),
    ],
)
def test_out_of_range_values_say_what_was_received_and_the_range(changes, words):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(changes)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "key, value, hint",
    [
        ("method", "splorra", "splora"),
        ("criterion", "tayler", "taylor"),
        ("optimizer", "adamm", "adam"),
        ("schedule", "linaer", "linear"),
    ],
)
def test_unknown_names_are_checked_against_the_registries(key, value, hint):
    with pytest.raises(UnknownNameError) as err:
        RunConfig.from_dict({key: value})
    assert f"did you mean {hint!r}" in str(err.value)


def test_methods_come_from_the_adapter_registry():
    assert methods() == ["finetune", "fine-pruning", *sparta.list_adapters()]
    for adapter in sparta.list_adapters():
        assert RunConfig(method=adapter).adapter == adapter
    assert RunConfig(method="fine-pruning").adapter is None
    assert not RunConfig(method="finetune").prunes
    assert not RunConfig(method="splora", steps=0).prunes


def test_numbers_and_text_targets():
    assert RunConfig(lr=1).lr == 1.0 and isinstance(RunConfig(lr=1).lr, float)
    assert RunConfig(target="0.3").target == 0.3  # from a command line
    assert RunConfig(target="macs=0.1").name == "splora-taylor-macs0.1-s0"


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_file_round_trip(tmp_path, suffix):
    config = RunConfig(
        method="sppara", criterion="l1", target="macs=0.25", image_size=32, lr=0.1, seed=3
    )
    path = save_config(config, tmp_path / f"run{suffix}")
    assert load_config(path) == config
    assert RunConfig.from_dict(config.to_dict()) == config


def test_toml_and_yaml_files_written_by_hand(tmp_path):
    (tmp_path / "a.toml").write_text('method = "fine-pruning"\nsteps = 3\nlr = 0.5\n')
    (tmp_path / "b.yml").write_text("method: fine-pruning\nsteps: 3\nlr: 0.5\n")
    assert load_config(tmp_path / "a.toml") == load_config(tmp_path / "b.yml")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "c.ini").write_text("")
    with pytest.raises(ConfigError, match="extension"):
        read_config_file(tmp_path / "c.ini")
    with pytest.raises(ConfigError, match="cannot parse"):
        (tmp_path / "d.toml").write_text("lr = = 1")
        load_config(tmp_path / "d.toml")


def test_grid_expansion(tmp_path):
    data = {
        "methods": ["finetune", "splora", "fine-pruning"],
        "criteria": ["l1", "taylor"],
        "densities": [0.5, 0.1],
        "seeds": [0, 1],
        "output_dir": str(tmp_path),
        "epochs": 2,
    }
    grid = GridConfig.from_dict(data)
    runs = grid.runs()
    # finetune: one run per seed; each pruning method: criteria x densities x seeds
    assert len(runs) == 2 + 2 * (2 * 2 * 2)
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert "splora-taylor-d0.1-s1" in names and "finetune-s1" in names
    assert all(r.output_dir == str(tmp_path / r.name) for r in runs)
    assert all(r.epochs == 2 for r in runs)
    path = save_config(grid, tmp_path / "grid.yaml")
    loaded = load_config(path)
    assert isinstance(loaded, GridConfig) and loaded.runs() == runs


def test_grid_validates_its_points():
    assert len(GridConfig().runs()) == 1  # empty lists keep the base's values
    with pytest.raises(ConfigError, match="densitie"):
        GridConfig.from_dict({"densitis": [0.5]})
    with pytest.raises(ConfigError, match="1.5"):
        GridConfig.from_dict({"densities": [0.5, 1.5]})
    with pytest.raises(ConfigError, match="must be a list"):
        GridConfig.from_dict({"seeds": 3})
