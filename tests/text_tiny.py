"""A tiny BERT saved to a folder (``hf:<folder>``) and small text classification files, for the
text tests: no download, a second to build."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

#: Words that decide the label (one per class), mixed into noise words.
CUE = {"neg": ["bad", "awful"], "pos": ["good", "fine"], "mid": ["so", "okay"]}
NOISE = [f"w{i}" for i in range(40)]
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *NOISE,
    *(w for ws in CUE.values() for w in ws),
]


def tiny_bert(folder: Path, layers: int = 2, hidden: int = 32, heads: int = 4) -> Path:
    """A randomly initialised BERT (seeded) and its word-piece tokenizer in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)  # reads vocab.txt
    assert tokenizer.vocab_size == len(VOCAB), "the tokenizer did not read the vocabulary"
    tokenizer.save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def examples(n: int, classes=("neg", "pos"), seed: int = 0) -> list[dict]:
    """``n`` sentences of six noise words and one cue word of their class (round-robin)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = classes[i % len(classes)]
        words = [rng.choice(CUE[label])] + [rng.choice(NOISE) for _ in range(6)]
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def write_csv(path: Path, rows: list[dict], columns=("text", "label")) -> Path:
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
