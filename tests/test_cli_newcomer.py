"""What a newcomer meets in the CLI (issue 15): options generated from the config's fields,
resume from the folder alone, refused overwrites, bad output folders, tables that survive a
pipe, ``--format``, one-line warnings and errors that name the CLI's flags, and the task bank
commands. Runs are tiny (built-in digits, one short epoch); a killed process resumed to the
same result is in tests/test_cli_newcomer_process.py.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import warnings

import pytest
import typer
from typer.testing import CliRunner

from sparta.cli import app
from sparta.cli.console import one_line
from sparta.cli.fields import given, with_config_options
from sparta.cli.runs import parse_args
from sparta.config import RunConfig
from sparta.config.checks import rule
from test_cli import _one_red_line

runner = CliRunner()
PIPE = {"COLUMNS": None, "RANK": None}  # output to a pipe: no width given; one process
FAST = [
    "--model", "digits_cnn", "--dataset", "digits", "--epochs", "1", "--recovery-epochs", "0",
    "--steps", "1", "--target", "0.3", "--batch-size", "512", "--scoring-batches", "1",
    "--device", "cpu", "--no-progress",
]  # fmt: skip
NAME = "splora-taylor-d0.3-s0"


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _run(*args, env=PIPE):
    return runner.invoke(app, ["run", *args], env=env)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished run at 30% filter density."""
    out = tmp_path_factory.mktemp("done") / "run"
    _ok(_run(*FAST, "--output-dir", str(out)))
    return out


# -- options generated from the dataclass --------------------------------------------------------
def test_help_lists_every_field_with_its_own_help():
    text = _ok(runner.invoke(app, ["run", "--help"], env={"COLUMNS": "300"})).stdout
    text = " ".join(text.replace("│", " ").split())
    for f in dataclasses.fields(RunConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert " ".join(f.metadata["help"].split()[:3]) in text, f.name  # the field's help
    assert "integer >= 1, default 64" in text  # batch_size: type, range, default
    assert "--cifar-stem" in text and "--no-cifar-stem" in text
    from sparta.adapters import list_adapters

    for method in ("finetune", "fine-pruning", *list_adapters()):  # from the registry
        assert method in text


@dataclasses.dataclass
class _Toy:
    """A config the CLI has never seen: every kind of field."""

    count: int = rule(3, int, low=1, help="how many")
    ratio: float | None = rule(None, float, low=0, high=1, none=True, help="a share")
    name: str = rule("a", str, help="a name")
    loud: bool = rule(False, bool, help="say more")


def _toy_app(seen: dict) -> typer.Typer:
    toy = typer.Typer()

    @toy.command()
    @with_config_options(_Toy, {"names": "name"})
    def main(ctx: typer.Context, fields: dict | None = None) -> None:
        seen.update(given(ctx, fields))

    @toy.command()
    def other() -> None:  # two commands: typer keeps the sub-command names
        pass

    return toy


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {}),
        (["--count", "5", "--ratio", "none"], {"count": 5, "ratio": None}),
        (["--ratio", "0.25", "--loud", "--name", "b"], {"ratio": 0.25, "loud": True, "name": "b"}),
        (["--no-loud", "--names", "x,y"], {"loud": False, "names": "x,y"}),
    ],
)
def test_a_new_dataclass_gets_options_with_no_cli_edit(args, expected):
    seen: dict = {}
    _ok(runner.invoke(_toy_app(seen), ["main", *args]))
    assert seen == expected  # only what was typed; an explicit none is kept


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "0"], "count must be >= 1, got 0"),
        (["--ratio", "2"], "ratio must be in [0, 1]"),
    ],
)
def test_a_new_dataclass_options_check_the_fields_rule(args, message):
    result = runner.invoke(_toy_app({}), ["main", *args])
    assert result.exit_code == 2 and message in result.output


def test_parse_args_keeps_only_what_was_typed():
    path, overrides, grid = parse_args(["--image-size", "none", "--no-download", "--seeds", "2,3"])
    assert (path, overrides, grid) == (
        None,
        {"image_size": None, "download": False},
        {"seeds": [2, 3]},
    )


# -- resume from the folder alone ----------------------------------------------------------------
def test_the_run_folder_records_its_full_config(done):
    saved = json.loads((done / "config.json").read_text())
    assert saved == RunConfig.from_dict(saved).to_dict()
    assert saved["target"] == 0.3 and saved["model"] == "digits_cnn"


def test_resume_of_a_finished_run_names_it_right(done):
    result = _ok(_run("--output-dir", str(done), "--resume"))
    assert f"{NAME}: done before" in result.stdout  # not the default target's d0.05
    same = _ok(_run("--output-dir", str(done), "--resume", "--device", "cpu", "--workers", "0"))
    assert "done before" in same.stdout  # flags that do not change results may be given


def test_resume_refuses_flags_that_differ_naming_them(done):
    line = _one_red_line(_run("--output-dir", str(done), "--resume", "--epochs", "2", "--lr", "1"))
    assert "--epochs (saved 1, now 2)" in line and "--lr (saved 0.01, now 1.0)" in line
    assert "--overwrite" in line


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    missing = tmp_path / "nothing"
    line = _one_red_line(_run("--output-dir", str(missing), "--resume"))
    assert "nothing to resume" in line and "no such folder" in line
    assert not missing.exists()
    missing.mkdir()
    line = _one_red_line(_run("--output-dir", str(missing), "--resume"))
    assert "nothing to resume" in line and "holds no run" in line and "dataset" not in line
    assert "needs --output-dir" in _one_red_line(_run("--resume"))


# -- refused overwrites and bad folders ----------------------------------------------------------
def test_a_second_run_into_a_run_folder_is_refused_unless_overwrite(done, tmp_path):
    before = (done / "result.json").read_text()
    line = _one_red_line(_run(*FAST, "--output-dir", str(done), "--seed", "1"))
    assert f"already holds run '{NAME}' (finished)" in line
    assert "--resume" in line and "--overwrite" in line
    assert (done / "result.json").read_text() == before
    failed = _run(*FAST, "--output-dir", str(done), "--dataset", "no-such-data", "--overwrite")
    assert failed.exit_code == 2  # a new run that fails before it starts...
    again = _ok(_run("--output-dir", str(done), "--resume")).stdout
    assert f"{NAME}: done before" in again  # ...leaves the finished run as it was
    assert "pass one" in _one_red_line(_run("--output-dir", str(done), "--resume", "--overwrite"))

    other = tmp_path / "other"
    _ok(_run(*FAST, "--output-dir", str(other)))
    _ok(_run(*FAST, "--output-dir", str(other), "--seed", "1", "--overwrite"))
    assert json.loads((other / "result.json").read_text())["config"]["seed"] == 1


def test_a_grid_run_again_with_other_settings_is_refused_unless_overwrite(tmp_path):
    grid = [*FAST, "--epochs", "0", "--seeds", "0,1", "--output-dir", str(tmp_path)]
    _ok(_run(*grid))
    assert _ok(_run(*grid)).stdout.count("done before") == 2  # same grid: continued
    line = _one_red_line(_run(*grid, "--lr", "0.5"))
    assert "holds a run with other settings" in line and "--lr (saved 0.01, now 0.5)" in line
    _ok(_run(*grid, "--lr", "0.5", "--overwrite"))
    saved = json.loads((tmp_path / "splora-taylor-d0.3-s1" / "result.json").read_text())
    assert saved["config"]["lr"] == 0.5
    assert json.loads((tmp_path / "config.json").read_text())["seeds"] == [0, 1]


@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_an_output_dir_that_is_a_file_or_cannot_be_created(kind, tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    out = target if kind == "file" else target / "run"
    line = _one_red_line(_run(*FAST, "--output-dir", str(out)))
    assert "--output-dir" in line and str(out) in line
    assert target.read_text() == "x"


# -- output ------------------------------------------------------------------------------------------
def test_a_piped_run_table_keeps_whole_names_and_paths(tmp_path):
    deep = tmp_path / ("a-long-folder-name-" * 5) / "a-run-with-a-long-name"
    lines = _ok(_run(*FAST, "--epochs", "0", "--output-dir", str(deep))).stdout.splitlines()
    assert any(NAME in line for line in lines)
    assert any(str(deep) in line for line in lines)  # in one piece
    assert max(len(line) for line in lines) < 500  # as wide as the content


def test_run_report_and_adapters_as_csv_and_json(done):
    rows = json.loads(_ok(_run("--output-dir", str(done), "--resume", "--format", "json")).stdout)
    final = json.loads((done / "result.json").read_text())["final"]
    assert rows[0]["name"] == NAME and rows[0]["accuracy"] == final["accuracy"]
    table = _ok(_run("--output-dir", str(done), "--resume", "--format", "csv")).stdout
    (row,) = list(csv.DictReader(io.StringIO(table)))  # "done before" went to stderr
    assert row["density"] == f"{final['density']:.4f}" and row["of"] == "filters"
    assert int(row["MACs"]) == final["macs"]  # a plain number, no thousands separators

    report = json.loads(_ok(runner.invoke(app, ["report", str(done), "--format", "json"])).stdout)
    assert report[0]["seeds"] == 1 and report[0]["accuracy_mean"] == final["accuracy"]
    adapters = _ok(runner.invoke(app, ["adapters", "--format", "csv"])).stdout
    assert adapters.splitlines()[0] == "name,layer kinds,options (defaults)"
    bad = _one_red_line(runner.invoke(app, ["adapters", "--format", "xml"]))
    assert "--format must be one of table, csv, json, got 'xml'" in bad


def test_no_progress_prints_one_line_per_phase_as_it_goes(tmp_path):
    result = _ok(_run(*FAST, "--output-dir", str(tmp_path / "r")))
    lines = result.stderr.splitlines()
    order = ["starting run", "epoch 1 (phase 0)", "evaluation after step 0", "pruning step 1/1",
             "evaluation after step 1", "finished: accuracy"]  # fmt: skip
    found = [next(i for i, line in enumerate(lines) if line.startswith(o)) for o in order]
    assert found == sorted(found)


# -- warnings and messages -----------------------------------------------------------------------
def test_library_warnings_are_one_line_once_and_rank_0_only(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        first = _ok(_run(*FAST, "--steps", "0", "--output-dir", str(tmp_path / "a")))
        warns = [line for line in first.stderr.splitlines() if "random weights" in line]
        assert len(warns) == 1 and warns[0].startswith("warning: method 'splora' freezes")
        assert "UserWarning" not in first.stderr and ".py:" not in first.stderr
        other = _run(*FAST, "--steps", "0", "--output-dir", str(tmp_path / "b"), env={"RANK": "1"})
        assert "warning:" not in other.stderr


def test_an_unknown_model_gets_close_names_not_the_whole_list(tmp_path):
    line = _one_red_line(_run(*FAST, "--model", "resnet1", "--output-dir", str(tmp_path / "m")))
    assert "close names: resnet18" in line and "alexnet" not in line


@pytest.mark.parametrize(
    ("library", "cli"),
    [
        ("task 'a' is already in the bank (pass overwrite=True)", "(pass --overwrite)"),
        ("train it and pass checkpoint=... instead", "pass --checkpoint ... instead"),
        ("set cifar_stem=False", "set --no-cifar-stem"),
        ("target macs=0.1 stays", "target macs=0.1 stays"),
        ("pass download=True (--download) to fetch it", "pass --download to fetch it"),
    ],
)
def test_messages_name_cli_flags(library, cli):
    assert one_line(library).endswith(cli)


# -- task banks ------------------------------------------------------------------------------------
def test_task_bank_commands(done, tmp_path):
    bank = tmp_path / "bank"
    typo = tmp_path / "typo"
    assert "does not exist" in _one_red_line(
        runner.invoke(app, ["tasks", "list", str(typo), "--model", "digits_cnn"])
    )
    assert not typo.exists()  # a read-only command creates no folder
    add = ["tasks", "add", str(bank)]
    _ok(runner.invoke(app, [*add, "good", str(done), "--model", "digits_cnn"]))
    assert "(pass --overwrite)" in _one_red_line(runner.invoke(app, [*add, "good", str(done)]))
    (bank / "broken.safetensors").write_bytes(b"not a task file")
    listed = _ok(runner.invoke(app, ["tasks", "list", str(bank), "--measure"], env=PIPE)).stdout
    assert "good" in listed and "broken.safetensors" in listed and "unusable" in listed
    rows = json.loads(_ok(runner.invoke(app, ["tasks", "list", str(bank), "--json"])).stdout)
    assert [r["name"] for r in rows] == ["good", "broken.safetensors"] and "error" in rows[1]
    table = _ok(runner.invoke(app, ["tasks", "list", str(bank), "--format", "csv"])).stdout
    assert [r["task"] for r in csv.DictReader(io.StringIO(table))] == ["good", "broken.safetensors"]

    built = json.loads(_ok(runner.invoke(app, ["tasks", "build", str(bank), "good", "--format",
                                               "json"])).stdout)  # fmt: skip
    assert built["macs"] == json.loads((done / "result.json").read_text())["final"]["macs"]
    switch = _one_red_line(runner.invoke(app, ["tasks", "switch", str(bank), "good"]))
    assert "now `sparta tasks build`" in switch

    no_base = runner.invoke(app, ["tasks", "remove", str(bank), "good", "--model", "x"])
    assert no_base.exit_code == 2 and "No such option: --model" in no_base.output
    assert "did you mean 'good'" in _one_red_line(
        runner.invoke(app, ["tasks", "remove", str(bank), "goo"])
    )
    _ok(runner.invoke(app, ["tasks", "remove", str(bank), "good"]))
    _ok(runner.invoke(app, ["tasks", "remove", str(bank), "broken"]))
    assert sorted(p.name for p in bank.iterdir()) == ["bank.json"]


def test_eval_and_bench_take_the_shared_options_and_format(done):
    final = json.loads((done / "result.json").read_text())["final"]
    table = _ok(runner.invoke(app, ["eval", str(done), "--device", "cpu", "--format", "csv"]))
    rows = {r["what"]: r["value"] for r in csv.DictReader(io.StringIO(table.stdout))}
    assert float(rows["accuracy recorded by the run"]) == pytest.approx(final["accuracy"], abs=1e-4)
    args = ["bench", str(done), "--batch-size", "2", "--repeats", "2", "--warmup", "0"]
    data = json.loads(_ok(runner.invoke(app, [*args, "--seed", "0", "--format", "json"])).stdout)
    assert data["macs"]["compact"] == final["macs"]  # the run counted a batch of 2 too
    refused = _one_red_line(runner.invoke(app, [*args, "--seed", "5"]))  # another random base
    assert "base fingerprints differ" in refused
