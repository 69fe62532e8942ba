"""Models by name for experiments: torchvision classifiers, ``timm:<name>``, ``hf:<id or folder>``
(with :func:`load_tokenizer` for its tokenizer), ``digits_cnn``.

``create("resnet18", num_classes=10, weights="DEFAULT", cifar_stem=True)`` builds, loads and
adjusts a model in one call; :func:`list_models` lists the names. Errors are
:class:`sparta.errors.UnknownNameError` for unknown names and :class:`sparta.errors.ConfigError`
for bad values.
"""

from .digits import digits_cnn
from .factory import apply_cifar_stem, create, list_models, replace_head
from .hf import load_tokenizer

__all__ = [
    "apply_cifar_stem",
    "create",
    "digits_cnn",
    "list_models",
    "load_tokenizer",
    "replace_head",
]
