"""Building a run's pieces from its config: datasets, the (wrapped) model, the pruner."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch import nn

from ..config import RunConfig
from ..errors import ConfigError
from ..pruning.pruner import Pruner
from .checkpoint import seed_everything
from .distributed import DistState


def split_train(config: RunConfig, train):
    """``(train part, validation part or None)``: with ``val_fraction > 0``, a seeded,
    stratified split of the training set by ``sparta.data.split_validation`` (seed: the run's
    ``seed``); the test set is never touched."""
    if config.val_fraction == 0:
        return train, None
    from ..data import split_validation

    return split_validation(train, config.val_fraction, config.seed)


def load_datasets(config: RunConfig):
    """``sparta.data.load_dataset`` with the config's dataset settings; a text dataset is
    tokenised with the tokenizer of the run's ``hf:`` model, to ``max_length`` tokens."""
    from ..data import load_dataset

    tokenizer = tokenizer_for(config.dataset, config.model)
    data = load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        download=config.download,
        image_size=config.image_size,
        seed=config.seed,
        tokenizer=tokenizer,
        max_length=config.max_length,
    )
    return subsets(data, config.dataset, config.seed, config.train_examples, config.test_examples)


def subsets(data, dataset: str, seed: int, train_examples=None, test_examples=None):
    """``data`` with its training and test sets cut to ``train_examples`` / ``test_examples``
    (a run's settings; seeded, class-balanced where labels are readable:
    ``sparta.data.subset``); ``None`` keeps a set whole."""
    from ..data import subset

    parts = {}
    for key, n, part in (("train_examples", train_examples, "train"),
                         ("test_examples", test_examples, "test")):  # fmt: skip
        whole = getattr(data, part)
        if n is None:
            continue
        if n > len(whole):
            raise ConfigError(
                f"{key}={n} is more than the {len(whole):,} examples of the {part} set of "
                f"{dataset!r}; pass at most {len(whole)} (or leave it unset for all of them)"
            )
        parts[part] = subset(whole, n, seed)
    return dataclasses.replace(data, **parts) if parts else data


def tokenizer_for(dataset: str, model: str):
    """The tokenizer of ``model`` when ``dataset`` is a text dataset and ``model`` an ``hf:``
    one (the text is encoded with the model's own tokenizer), else ``None``."""
    from ..data.text import TEXT_DATASETS

    if dataset not in TEXT_DATASETS or not model.startswith("hf:"):
        return None
    from ..models import load_tokenizer

    return load_tokenizer(model)


def build_model(config: RunConfig, model, data, dist: DistState) -> nn.Module:
    """The run's model on ``dist.device``: ``model`` (copied) or ``sparta.models.create``'s,
    wrapped with the adapter (seeded by ``config.seed``) or, for the baselines, all trainable."""
    if model is None:
        from ..models import create

        pretrained = config.model.startswith("hf:")  # the source's own weights
        if (
            config.adapter is not None
            and config.weights is None
            and config.checkpoint is None
            and not pretrained
        ):
            warnings.warn(
                f"method {config.method!r} freezes the base, but {config.model!r} is built "
                "with random weights (no --weights or --checkpoint): expect poor accuracy; "
                "adapters need a pretrained base",
                UserWarning,
                stacklevel=2,
            )
        model = create(
            config.model,
            num_classes=data.num_classes,
            weights=config.weights,
            checkpoint=config.checkpoint,
            cifar_stem=config.cifar_stem,
        )
    else:
        model = copy.deepcopy(model)  # the caller's model stays as it was
    if config.sync_batchnorm and dist.enabled and dist.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seed_everything(config.seed)  # the adapters' initialisation
    if config.adapter is None:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from ..wrapping import wrap

        model = wrap(model, config.adapter, inplace=True, **adapter_options(config))
    return model.to(dist.device)


def adapter_options(config: RunConfig) -> dict:
    """The config's options that the adapter takes: ``rank``, and ``init_scale``, ``block``,
    ``prototypes``, ``prototype_rank``, ``shared`` when set (``None`` leaves each adapter's own
    default, e.g. 1e-4 for ``init_scale``)."""
    from ..adapters import get_adapter
    from ..config.pruning import ADAPTER_OPTIONS

    accepted = get_adapter(config.adapter).option_names()
    given = {"rank": config.rank, "init_scale": config.init_scale}
    given.update({k: getattr(config, k) for k in ADAPTER_OPTIONS})
    return {k: v for k, v in given.items() if k in accepted and v is not None}


def example_inputs(dataset, device: torch.device):
    """A batch of the first two training inputs (for tracing groups and counting MACs): a
    tensor, or a dict of tensors for tokenised text."""
    from torch.utils.data import default_collate

    from .loop import to_device

    if len(dataset) == 0:
        raise ConfigError("the training set is empty")
    xs = [dataset[i][0] for i in range(min(2, len(dataset)))]
    if isinstance(xs[0], dict):
        return to_device(default_collate(xs), device)
    return torch.stack([torch.as_tensor(x) for x in xs]).to(device)


def pruner_for_run(config: RunConfig, model: nn.Module, example) -> Pruner:
    """The config's :class:`~sparta.pruning.Pruner` (``seed`` goes to criteria taking one)."""
    from ..pruning.importance import get_criterion

    options = (
        {"seed": config.seed} if "seed" in get_criterion(config.criterion).option_names else {}
    )
    return Pruner(
        model,
        example,
        criterion=config.criterion,
        target=config.target,
        steps=config.steps,
        schedule=config.schedule,
        ranking=config.ranking,
        round_to=config.round_to,
        **options,
    )
