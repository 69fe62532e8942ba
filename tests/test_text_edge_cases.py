"""The text files users really have: quoted line breaks, extra columns, a byte-order mark, CRLF,
headers in other cases, labels with spaces, and what must be refused with the line to fix:
an unquoted comma (it shifted the label), one class, an empty text, bytes that are not UTF-8,
a header alone, ``max_length`` too short for the special tokens or too long for the model."""

from __future__ import annotations

import json

import pytest

from sparta.data import load_dataset
from sparta.data.text import read_text_file
from sparta.errors import ConfigError
from sparta.models import load_tokenizer
from text_tiny import examples, tiny_bert

ROWS = examples(20)  # 'neg' / 'pos', seven words each


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(f"hf:{tiny_bert(tmp_path_factory.mktemp('bert'))}")


def _csv(rows=ROWS, header="text,label", end="\n", cell=lambda r: f"{r['text']},{r['label']}"):
    return end.join([header, *map(cell, rows)]) + end


def _jsonl(rows=ROWS, end="\n"):
    return "".join(json.dumps(r) + end for r in rows)


#: name -> (file name, bytes); every one holds the 20 examples of ROWS
GOOD = {
    "quoted line breaks": (
        "a.csv",
        _csv(cell=lambda r: f'"{r["text"]}\nmore, words\f",{r["label"]}').encode(),
    ),
    "extra columns": (
        "a.csv",
        _csv(
            header="id,text,source,label", cell=lambda r: f"7,{r['text']},web,{r['label']}"
        ).encode(),
    ),
    "byte-order mark": ("a.csv", ("\ufeff" + _csv()).encode()),
    "CRLF": ("a.csv", _csv(end="\r\n").encode()),
    "header case and spaces": ("a.csv", _csv(header=" Text , LABEL ").encode()),
    "jsonl byte-order mark": ("a.jsonl", ("\ufeff" + _jsonl()).encode()),
    "jsonl CRLF and extra keys": (
        "a.jsonl",
        _jsonl([{"id": 1, **r, "meta": {"x": [1]}} for r in ROWS], end="\r\n").encode(),
    ),
    "jsonl raw U+2028 in a text": (
        "a.jsonl",
        "".join(
            json.dumps({**r, "text": r["text"] + "\u2028end"}, ensure_ascii=False) + "\n"
            for r in ROWS
        ).encode(),
    ),
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_files_users_write_load_every_example(tmp_path, tokenizer, case):
    name, content = GOOD[case]
    (tmp_path / name).write_bytes(content)
    items = read_text_file(tmp_path / name)
    assert [label for _, label in items] == [r["label"] for r in ROWS]
    assert all(text.startswith(r["text"]) for (text, _), r in zip(items, ROWS))
    data = load_dataset("text", data_dir=tmp_path / name, tokenizer=tokenizer, max_length=12)
    assert data.classes == ["neg", "pos"] and len(data.train) + len(data.test) == 20


def test_quoted_line_breaks_stay_in_the_text(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('text,label\n"one\ntwo, three",pos\nfour,neg\n', encoding="utf-8")
    assert read_text_file(path) == [("one\ntwo, three", "pos"), ("four", "neg")]


def test_labels_with_spaces_are_class_names(tmp_path, tokenizer):
    path = tmp_path / "a.csv"
    path.write_bytes(_csv(cell=lambda r: f'{r["text"]},"very {r["label"]} "').encode())
    data = load_dataset("text", data_dir=path, tokenizer=tokenizer, max_length=12)
    assert data.classes == ["very neg", "very pos"]


BAD = {
    "unquoted comma": (
        "a.csv",
        _csv(ROWS[:4]) + "good words, more words,pos\n",
        r"line 6 has 3 field\(s\), its header 2; quote a text that holds commas",
    ),
    "missing field": ("a.csv", _csv(ROWS[:4]) + "just text\n", r"line 6 has 1 field\(s\)"),
    "one class": ("a.csv", _csv([r for r in examples(20) if r["label"] == "neg"]), "at least two"),
    "integer labels of one class": (
        "a.jsonl",
        _jsonl([{**r, "label": 0} for r in ROWS]),
        "all have the label '0'; a classifier needs at least two classes",
    ),
    "empty text": ("a.csv", _csv(ROWS[:4]) + ",neg\n", "line 6 has no text"),
    "header only": ("a.csv", "text,label\n", "holds no examples"),
    "semicolons": ("a.csv", _csv(header="text;label"), "does not look comma-separated"),
    "a column twice": ("a.csv", _csv(header="text,Text,label"), "names the column.s. text twice"),
    "null label": (
        "a.jsonl",
        _jsonl(ROWS[:3]) + '{"text": "x", "label": null}\n',
        "line 4 has label None",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_what_cannot_be_read_right_is_refused_with_its_line(tmp_path, tokenizer, case):
    name, content, message = BAD[case]
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_dataset("text", data_dir=tmp_path / name, tokenizer=tokenizer, max_length=12)


def test_bytes_that_are_not_utf8_are_refused_with_their_line_and_a_fix(tmp_path, tokenizer):
    path = tmp_path / "a.csv"
    path.write_bytes(_csv(ROWS[:4]).encode() + "caf\xe9,neg\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 \(line 6: .*iconv -f latin1 -t utf-8"):
        load_dataset("text", data_dir=path, tokenizer=tokenizer)


@pytest.mark.parametrize(
    ("length", "message"),
    [
        (1, "max_length 1 leaves no room for text: the tokenizer adds 2 special"),
        (2, "use --max-length 3 or more"),
        (33, r"max_length 33 is longer than the model takes \(32 tokens\)"),
    ],
)
def test_max_length_must_fit_the_special_tokens_and_the_model(tmp_path, tokenizer, length, message):
    """With 1 or 2 the tokenizer could not truncate and returned whole texts; the tiny BERT
    has 32 positions (its config), and its tokenizer was saved without a limit: a longer
    max_length failed deep in the model's position embeddings."""
    path = tmp_path / "a.csv"
    path.write_text(_csv(), encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_dataset("text", data_dir=path, tokenizer=tokenizer, max_length=length)
    for fits in (3, 32):
        data = load_dataset("text", data_dir=path, tokenizer=tokenizer, max_length=fits)
        assert data.train[0][0]["input_ids"].shape == (fits,)
