"""The paper-comparison driver (``sparta.app.paper``): planning trajectories, running them in one
and in two worker processes, resuming, rows at each filter density, aggregation over seeds,
the claims with the structural ceiling, the table and the plots. A tiny CNN on the 8x8 digits
keeps every run to about a second."""

from __future__ import annotations

import json

import pytest
import torch

from sparta.app import paper, paper_report
from sparta.data import load_dataset
from sparta.errors import ConfigError
from sparta.models import create
from sparta.train import run

GRID = paper.Grid(methods=("fine-pruning", "splora-r4"), densities=(0.5, 0.25), step_fraction=0.25)
SETTINGS = dict(
    epochs=1,
    batch_size=32,
    lr=0.01,
    device="cpu",
    scoring_batches=2,
    val_fraction=0.2,
    model="digits_cnn",
    dataset="digits-target",
)


def tiny_model():
    torch.manual_seed(0)
    return create("digits_cnn", num_classes=5)


def tiny_data():
    return load_dataset("digits-target", seed=0)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper1")
    return out, paper.compare(GRID, tiny_model, tiny_data, out, workers=1, **SETTINGS)


def test_grid_steps_put_every_density_on_the_schedule():
    assert paper.Grid(densities=(0.3, 0.1)).steps == 18  # the paper's 5% of filters per step
    assert paper.Grid(densities=(0.1, 0.3), step_fraction=0.1).steps == 9
    assert paper.Grid(densities=(0.1, 0.3)).densities == (0.3, 0.1)
    with pytest.raises(ConfigError, match="not reached by steps of 0.2"):
        paper.Grid(densities=(0.3, 0.1), step_fraction=0.2)
    with pytest.raises(ConfigError, match="filter densities in"):
        paper.Grid(densities=(1.0,))
    with pytest.raises(ConfigError):
        paper.Grid(methods=("lora-ish",))
    assert paper.method_spec("splora-r16")["rank"] == 16


def test_plan_one_trajectory_per_method_criterion_seed(tmp_path):
    grid = paper.Grid(methods=("finetune", "fine-pruning", "splora-r8"), criteria=("taylor", "l1"),
                      densities=(0.3, 0.1), seeds=(0, 1))  # fmt: skip
    jobs = paper.plan(grid, tmp_path, epochs=2, recovery_epochs=1)
    assert len(jobs) == 2 + 2 * 2 * 2  # finetune: one per seed
    keys = {j.key for j in jobs}
    assert "finetune/dense/s1" in keys and "splora-r8/l1/s0" in keys
    by_key = {j.key: j.config for j in jobs}
    sl = by_key["splora-r8/taylor/s0"]
    assert (sl.method, sl.rank, sl.target, sl.steps, sl.criterion) == (
        "splora",
        8,
        0.1,
        18,
        "taylor",
    )
    assert sl.optimizer == "sgd" and sl.momentum == 0.9 and sl.weight_decay == 5e-4
    assert sl.output_dir == str(tmp_path / "splora-r8" / "taylor" / "s0")
    ft = by_key["finetune/dense/s0"]
    assert ft.steps == 0 and ft.epochs == 2 + 18  # the same training budget as a trajectory
    other = paper.plan(grid, tmp_path, method_overrides={"finetune": {"epochs": 3}})
    assert next(j for j in other if j.method == "finetune").config.epochs == 3
    with pytest.raises(ConfigError, match="not in the grid"):
        paper.plan(grid, tmp_path, method_overrides={"sppara": {}})


def test_rows_come_from_one_trajectory_per_method(one_worker):
    out, c = one_worker
    assert [o["status"] for o in c.outcomes] == ["done", "done"] and not c.failed
    assert len(c.rows) == 4  # 2 methods x 2 densities x 1 seed
    for r in c.rows:
        assert r["filter_density"] == pytest.approx(r["target_density"], abs=0.02)
        assert 0 < r["weight_density"] < 1 and r["macs"] > 0
        assert r["mflops"] == pytest.approx(2 * r["macs"] / 1e6)
        assert r["val_accuracy"] is not None and 0 <= r["accuracy"] <= 1
        assert r["learned_parameters_paper"] >= r["learned_parameters"]  # all norms, whole head
    fp = {r["target_density"]: r for r in c.rows if r["method"] == "fine-pruning"}
    assert fp[0.25]["step"] == 3 and fp[0.5]["step"] == 2  # read along the way
    assert fp[0.25]["learned_parameters"] < fp[0.5]["learned_parameters"]
    for r in (r for r in c.rows if r["method"] == "splora-r4"):
        assert r["adapter_parameters"] + r["rest_stored"] == r["learned_parameters"]
        assert r["adapter_parameters"] + r["rest_paper"] == r["learned_parameters_paper"]
        assert r["adapter_per_rank"] * 4 == r["adapter_parameters"]
    # every evaluation record carries the adapters' share; it shrinks as channels are pruned
    record = json.loads((out / "splora-r4" / "taylor" / "s0" / "result.json").read_text())
    shares = [s["adapter_parameters"] for s in record["steps"]]
    assert len(shares) == 4 and shares == sorted(shares, reverse=True) and shares[-1] < shares[0]
    fp_record = json.loads((out / "fine-pruning" / "taylor" / "s0" / "result.json").read_text())
    assert {s["adapter_parameters"] for s in fp_record["steps"]} == {0}


def test_claims_table_and_plots(one_worker, tmp_path):
    _, c = one_worker
    checks = c.claims["checks"]
    assert c.claims["splora"] == "splora-r4"
    assert {(x["claim"], x["accounting"]) for x in checks} == {
        ("lowest", "stored"),
        ("lowest", "paper"),
    }  # 30% is not in this grid
    for x in checks:
        assert x["ratio"] == pytest.approx(x["fine_pruning_learned"] / x["splora_learned"])
        assert x["holds"] == (x["accurate_enough"] and x["ratio"] >= 2)
    ceiling = c.claims["ceiling"]
    assert len(ceiling) == 4  # 2 densities x 2 accountings
    for e in ceiling:
        assert e["ceiling"] > e["ratio_at_rank"]["1"] > e["ratio_at_rank"]["32"]
    lines = paper.claim_lines(c.claims)
    assert any("structural ceiling" in line for line in lines)
    md = paper_report.markdown_table(c.aggregated)
    assert md.count("\n") == 4 and "50% filters: learned (paper)" in md
    paths = paper_report.write_plots(c.aggregated, tmp_path)
    assert [p.name for p in paths] == list(paper_report.PLOTS)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    json.dumps(c.to_dict())  # results are plain JSON


def test_finished_runs_are_not_rerun_and_a_killed_run_resumes(one_worker, tmp_path):
    out, first = one_worker
    result = out / "fine-pruning" / "taylor" / "s0" / "result.json"
    stamp = result.stat().st_mtime_ns
    again = paper.compare(GRID, tiny_model, tiny_data, out, workers=1, **SETTINGS)
    assert [o["status"] for o in again.outcomes] == ["skipped", "skipped"]
    assert result.stat().st_mtime_ns == stamp and again.rows == first.rows

    jobs = paper.plan(GRID, tmp_path, **SETTINGS)

    class Killed(Exception):
        pass

    def kill(n, path):
        if n == 3:
            raise Killed

    with pytest.raises(Killed):  # killed after its third checkpoint
        run(jobs[1].config, model=tiny_model(), datasets=tiny_data(), progress=False,
            on_checkpoint=kill)  # fmt: skip
    outcomes = paper.run_jobs(jobs, tiny_model, tiny_data, workers=1)
    assert [o["status"] for o in outcomes] == ["done", "done"]
    assert outcomes[1]["resumed"] and not outcomes[0]["resumed"]
    assert paper.rows(jobs, outcomes, GRID) == first.rows  # the same numbers as uninterrupted


def test_two_workers_give_the_same_rows_and_failures_are_reported(one_worker, tmp_path):
    _, first = one_worker
    jobs = paper.plan(GRID, tmp_path / "grid", **SETTINGS)[:1]  # fine-pruning
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a run folder should be")
    bad = paper.plan(paper.Grid(methods=("fine-pruning",), densities=(0.5,), step_fraction=0.5),
                     blocked, **SETTINGS)  # fmt: skip
    seen = []
    outcomes = paper.run_jobs(
        [*jobs, *bad], tiny_model, tiny_data, workers=2, on_outcome=seen.append
    )
    assert len(seen) == 2
    assert outcomes[0]["status"] == "done", outcomes[0].get("traceback")
    assert outcomes[1]["status"] == "failed"
    assert "blocked" in outcomes[1]["error"] and outcomes[1]["traceback"]
    expected = [r for r in first.rows if r["method"] == "fine-pruning"]
    assert paper.rows(jobs, outcomes[:1], GRID) == expected  # same numbers in another process


def test_aggregate_mean_and_std_over_seeds():
    base = dict(method="m", label="M", criterion="l1", rank=None, target_density=0.3)
    rows = [
        {**base, "seed": s, "accuracy": a, "learned_parameters": 100, "macs": 10, "mflops": 2e-5}
        for s, a in ((0, 0.8), (1, 0.9))
    ]
    (agg,) = paper.aggregate(rows)
    assert agg["n"] == 2 and agg["seeds"] == [0, 1]
    assert agg["accuracy"] == pytest.approx(0.85)
    assert agg["accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert agg["learned_parameters_std"] == 0 and agg["val_accuracy"] is None


def _agg(method, density, acc, stored, paper_count, rest=None, per_rank=None, rank=None):
    return dict(method=method, label=method, criterion="taylor", rank=rank, n=3,
                target_density=density, accuracy=acc, accuracy_std=0.01,
                learned_parameters=stored, learned_parameters_paper=paper_count,
                rest_stored=None if rest is None else rest[0],
                rest_paper=None if rest is None else rest[1], adapter_per_rank=per_rank)  # fmt: skip


def test_claims_numbers_in_both_accountings():
    agg = [
        _agg("fine-pruning", 0.3, 0.90, 300_000, 330_000),
        _agg("fine-pruning", 0.1, 0.80, 40_000, 70_000),
        _agg("splora-r8", 0.3, 0.885, 18_000, 40_000, (2_000, 24_000), 2_000, 8),
        _agg("splora-r8", 0.1, 0.81, 15_000, 45_000, (1_000, 31_000), 1_750, 8),
    ]
    c = paper.claims(agg)
    got = {(x["claim"], x["accounting"]): x for x in c["checks"]}
    assert got["lowest", "stored"]["holds"]  # 81% >= 80%, 2.67x fewer
    assert not got["lowest", "paper"]["holds"]  # 70K / 45K = 1.56x < 2x
    assert got["mid", "stored"]["holds"]  # 1.5 points behind (<= 2), 16.7x fewer
    mid_paper = got["mid", "paper"]
    assert mid_paper["accurate_enough"] and not mid_paper["ratio_enough"]  # 8.25x
    assert mid_paper["accuracy_gap_points"] == pytest.approx(-1.5)
    ceiling = {(e["density"], e["accounting"]): e for e in c["ceiling"]}
    e = ceiling[0.3, "stored"]
    assert e["ceiling"] == pytest.approx(150.0)  # 300K / 2K
    assert e["ratio_at_rank"]["8"] == pytest.approx(300_000 / 18_000)
    assert e["max_rank_for_15x"] == 9  # 2000 + 2000 r <= 20000
    assert ceiling[0.3, "paper"]["max_rank_for_15x"] == 0  # 24K of head and norms > 22K
    text = "\n".join(paper.claim_lines(c))
    assert (
        "does not hold" in text and "no rank reaches 15x" in text and "15x needs rank <= 9" in text
    )
