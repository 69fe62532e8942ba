"""``hf:<local folder>`` models a user saves with ``save_pretrained`` from tiny configs, with
tokenizers built offline (word-piece for BERT, byte-level BPE for RoBERTa and Llama): the
tokenizer knows the model's length limit even when saved without one, a decoder's tokenizer
without a padding token pads with its end-of-text token (and the classifier pools at the last
real token), and ``sparta run`` on such a folder ends in a task that builds exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sparta
from sparta.cli import app
from sparta.data import load_dataset
from sparta.models import create, load_tokenizer
from sparta.train.rebuild import BaseSpec
from text_tiny import examples, tiny_bert, write_csv

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def bpe_folder(folder: Path, arch: str) -> Path:
    """A byte-level BPE tokenizer trained on the test sentences (no padding token, no length
    limit saved) and a seeded tiny ``arch`` model, saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([e["text"] for e in examples(60, ("neg", "pos", "mid"))], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=specials[0], bos_token=specials[0], unk_token=specials[1]
    )
    fast.save_pretrained(folder)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=len(fast), num_key_value_heads=2, max_position_embeddings=40,
            eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id, **sizes,
        )  # fmt: skip
        model = transformers.LlamaModel
    else:  # RoBERTa: positions start after the padding index (1), so 40 - 2 = 38 tokens
        config = transformers.RobertaConfig(
            vocab_size=len(fast), max_position_embeddings=40, pad_token_id=1, **sizes
        )
        model = transformers.RobertaModel
    torch.manual_seed(0)
    model(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-folders")
    write_csv(root / "train.csv", examples(48, seed=1))
    write_csv(root / "test.csv", examples(16, seed=2))
    return root, {
        "bert": tiny_bert(root / "bert"),
        "roberta": bpe_folder(root / "roberta", "roberta"),
        "llama": bpe_folder(root / "llama", "llama"),
    }


@pytest.mark.parametrize(("arch", "limit"), [("bert", 32), ("roberta", 38), ("llama", 40)])
def test_the_tokenizer_knows_the_model_s_limit(folders, arch, limit):
    """Saved without ``model_max_length`` (1e30): the limit comes from the model's config."""
    root, paths = folders
    tokenizer = load_tokenizer(f"hf:{paths[arch]}")
    assert tokenizer.model_max_length == limit
    data = load_dataset("text", data_dir=root, tokenizer=tokenizer)  # max_length: the limit
    assert data.train[0][0]["input_ids"].shape == (limit,)
    model = create(f"hf:{paths[arch]}", num_classes=2).eval()
    batch = torch.stack([data.train[i][0]["input_ids"] for i in range(4)])
    mask = torch.stack([data.train[i][0]["attention_mask"] for i in range(4)])
    with torch.no_grad():
        assert model(input_ids=batch, attention_mask=mask).logits.shape == (4, 2)


def test_a_decoder_pads_with_its_end_of_text_token_and_pools_the_last_real_one(folders):
    """Padding failed ('Asking to pad but the tokenizer does not have a padding token'), and
    the classifier needs the padding id to find each example's last token."""
    _, paths = folders
    tokenizer = load_tokenizer(f"hf:{paths['llama']}")
    assert tokenizer.pad_token == "<|endoftext|>"
    model = create(f"hf:{paths['llama']}", num_classes=2).eval()
    assert model.config.pad_token_id == tokenizer.pad_token_id
    text = examples(1)[0]["text"]
    short = tokenizer([text], return_tensors="pt")
    padded = tokenizer([text], padding="max_length", max_length=30, return_tensors="pt")
    with torch.no_grad():
        want = model(**short).logits
        got = model(**padded).logits
    assert torch.allclose(got, want, atol=1e-5)  # padding changes nothing


def _run(folder: Path, data: Path, out: Path, *method: str):
    args = [
        "run", "--model", f"hf:{folder}", "--dataset", "text", "--data-dir", str(data),
        "--max-length", "16", "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.003",
        "--device", "cpu", "--output-dir", str(out), "--no-progress", "--epochs", "2", *method,
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize(
    ("arch", "method"),
    [
        ("roberta", ("--method", "splora", "--rank", "4", "--target", "0.5", "--steps", "1")),
        ("llama", ("--method", "splopa", "--block", "8", "--prototypes", "4", "--target", "0.5")),
    ],
)
def test_sparta_run_on_a_saved_folder_builds_exactly(folders, tmp_path, arch, method):
    root, paths = folders
    result = _run(paths[arch], root, tmp_path / arch, *method)
    c = result["config"]
    task = sparta.Task.load(tmp_path / arch / result["files"]["task"])
    base = BaseSpec(model=c["model"], num_classes=2, seed=c["seed"]).create()
    compact = sparta.build(base, task)  # verify=True: compact == the stored masked outputs
    assert sum(p.numel() for p in compact.parameters()) <= sum(p.numel() for p in base.parameters())
