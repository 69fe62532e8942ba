"""One run (:class:`RunConfig`) and a grid of runs (:class:`GridConfig`), validated on
construction."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, UnknownNameError
from .checks import check_device, check_fields, check_keys, rule
from .pruning import check_method_options, pruner_granularity
from .recipes import get_recipe

#: Methods that are not adapters: full fine-tuning and the fine-pruning baseline.
BASELINE_METHODS = ("finetune", "fine-pruning")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("cosine", "constant", "step")
RANKINGS = ("global", "local")


def methods() -> list[str]:
    """Every accepted ``method``: the baselines and every registered adapter."""
    from ..adapters import list_adapters

    return [*BASELINE_METHODS, *list_adapters()]


@dataclass
class RunConfig:
    """Everything one experiment run needs. Defaults follow the paper's protocol where it
    fixes them (iterative pruning in 19 steps to 5% filter density, SPLoRA rank 8); the whole
    protocol is the ``paper`` recipe (:meth:`from_recipe`).

    ``target``: a bare number is a **filter density**, the fraction of filters (output
    channels) kept, which is the paper's meaning of "density" (Table 1's 30% and 10%); text
    ``sparsity=S`` is the fraction of prunable **weights** removed (weight density ``1 - S``) and
    ``macs=F`` the fraction of MACs kept.

    ``step_fraction``: when set, ``steps`` is derived from the target,
    ``steps = max(1, round((1 - level) / step_fraction))`` where ``level`` is the kept fraction
    the target names (the filter density for a bare number), so that each step removes
    ``step_fraction`` of the original filters; a ``steps`` given explicitly (in a file, a flag or
    :meth:`replace`) turns the derivation off.

    ``val_fraction``: the share of the training data held out (seeded, stratified) as a
    validation split; every evaluation then records ``val_accuracy`` next to the test
    ``accuracy``. ``adapter_lr_scale`` multiplies the learning rate of adapter parameters only.

    ``recipe`` names the preset the config started from (see :data:`RECIPES`); it is applied by
    :meth:`from_dict`, :meth:`from_recipe` and :meth:`replace`, not by the constructor, which only
    checks the name.
    """

    recipe: str | None = rule(
        None, str, none=True,
        help="a named preset applied first (flags and file keys override it; "
        "sparta.config.recipes() gives each value's reason)",
    )  # fmt: skip
    # model
    model: str = rule(
        "resnet18", str, help="model name: torchvision (resnet18, ...), timm:NAME or digits_cnn"
    )
    weights: str | None = rule(
        None,
        str,
        none=True,
        help="pretrained weights, e.g. DEFAULT (torchvision downloads them once)",
    )
    checkpoint: str | None = rule(None, str, none=True, help="a local state dict to start from")
    cifar_stem: bool = rule(False, bool, help="3x3 stem without max-pool (CIFAR ResNets)")
    # data
    dataset: str = rule(
        "cifar10", str, help="cifar10, cifar100, flowers102, pets, imagefolder, digits, ..."
    )
    data_dir: str = rule("data", str, help="where datasets are read from (and downloaded to)")
    download: bool = rule(False, bool, help="let torchvision download a missing dataset")
    image_size: int | None = rule(
        None, int, low=1, none=True, help="resize inputs to this side length"
    )
    max_length: int = rule(
        128, int, low=1, help="text datasets: tokens per example (padded or truncated to it)"
    )
    train_examples: int | None = rule(
        None, int, low=1, none=True,
        help="train on this many training examples (a seeded, class-balanced subset; "
        "before val_fraction's split)",
    )  # fmt: skip
    test_examples: int | None = rule(
        None, int, low=1, none=True,
        help="evaluate on this many test examples (a seeded, class-balanced subset)",
    )  # fmt: skip
    # method
    method: str = rule(
        "splora", str, help="the baseline or the adapter trained (adapters: `sparta adapters`)"
    )
    rank: int = rule(8, int, low=1, help="adapter rank (adapters that take one)")
    init_scale: float | None = rule(
        None, float, low=0, high=1, none=True,
        help="adapters start uniform(+-init_scale); none: each adapter's default (1e-4)",
    )  # fmt: skip
    block: int | None = rule(
        None, int, low=1, none=True, help="splopa: block side p = q (none: the adapter's, 32)"
    )
    prototypes: int | None = rule(
        None, int, low=1, none=True, help="splopa: number of block prototypes R (none: 64)"
    )
    prototype_rank: int | None = rule(
        None, int, low=1, high=2, none=True, help="splopa: rank of each prototype (none: 1)"
    )
    shared: bool | None = rule(
        None, bool, none=True, help="splopa: one set of prototypes for all layers (none: no)"
    )
    # pruning
    criterion: str = rule("taylor", str, help="importance criterion of the channels pruned")
    target: str | float = rule(
        0.05, (str, float),
        help="a bare number is a FILTER density, the fraction of filters kept (the paper's "
        "meaning: 0.3 keeps 30% of the filters); sparsity=S is the fraction of WEIGHTS removed, "
        "macs=F the fraction of MACs kept",
    )  # fmt: skip
    steps: int = rule(19, int, low=0, help="pruning steps (0: no pruning); overrides step_fraction")
    step_fraction: float | None = rule(
        None, float, low=0, high=1, open_low=True, none=True,
        help="share of the original filters removed per step: steps derived as "
        "round((1 - density) / step_fraction) (paper recipe: 0.05)",
    )  # fmt: skip
    schedule: str = rule("linear", str, help="how the pruned share grows over the steps")
    ranking: str = rule(
        "global", str, help="channels ranked over the whole model or within each layer"
    )
    round_to: int | None = rule(
        None, int, low=1, none=True, help="keep channel counts multiples of this"
    )
    scoring_batches: int = rule(
        16, int, low=1, help="training batches scored before each pruning step"
    )
    pruner: str | None = rule(
        None, str, none=True,
        help="channels or blocks (none: blocks for an adapter with block masks, e.g. splopa)",
    )  # fmt: skip
    block_criterion: str = rule(
        "movement", str, help="blocks pruner: magnitude, activation, movement, soft-movement, l0"
    )
    granularity: str = rule(
        "blocks", str, help="blocks pruner: blocks, heads, neurons or heads,neurons"
    )
    warmup: float = rule(
        0.1, float, low=0, high=1, help="blocks pruner: share of training steps before pruning"
    )
    cooldown: float = rule(
        0.1, float, low=0, high=1, help="blocks pruner: share of training steps at the target"
    )
    penalty: float | None = rule(
        None, float, low=0, none=True,
        help="blocks pruner: weight of the criterion's loss penalty (soft-movement, l0; none: 1)",
    )  # fmt: skip
    # training
    epochs: int = rule(10, int, low=0, help="epochs of initial training")
    recovery_epochs: int = rule(1, int, low=0, help="epochs of training after every pruning step")
    batch_size: int = rule(64, int, low=1, help="global batch size (split over DDP processes)")
    optimizer: str = rule("sgd", str, help="optimiser")
    lr: float = rule(0.01, float, low=0, open_low=True, help="learning rate")
    weight_decay: float = rule(0.0, float, low=0, help="weight decay")
    momentum: float = rule(0.9, float, low=0, high=1, open_high=True, help="SGD momentum")
    lr_schedule: str = rule(
        "cosine", str,
        help="cosine, constant or step (lr / 10 at 50% and 75%), over each training phase",
    )  # fmt: skip
    adapter_lr_scale: float = rule(
        1.0, float, low=0, open_low=True,
        help="multiplies lr for adapter parameters only (head, norms, biases keep lr)",
    )  # fmt: skip
    val_fraction: float = rule(
        0.0, float, low=0, high=1, open_high=True,
        help="share of the training data held out (seeded, stratified) as a validation split; "
        "records val_accuracy",
    )  # fmt: skip
    # run
    seed: int = rule(0, int, low=0, help="seed of data order, initialisation and split")
    output_dir: str = rule(
        "runs/run", str, help="folder of the run (of a grid: parent of its runs)"
    )
    device: str = rule("auto", str, help="auto, cpu, cuda, cuda:INDEX or mps")
    workers: int = rule(0, int, low=0, help="data loader worker processes")
    find_unused_parameters: bool = rule(
        False, bool, help="DDP option for models with unused parameters"
    )  # see sparta.train.distributed
    sync_batchnorm: bool = rule(False, bool, help="synchronised BatchNorm under DDP (CUDA only)")
    tensorboard: bool = rule(
        False, bool, help="log loss, accuracy, density, MACs, learned parameters to TensorBoard"
    )

    def __post_init__(self):
        check_fields(self)
        self._check_names()

    def _check_names(self) -> None:
        from ..pruning.importance import get_criterion
        from ..pruning.pruner import Target
        from ..pruning.schedules import get_schedule

        if self.method not in methods():
            raise UnknownNameError("method", self.method, methods())
        get_criterion(self.criterion)
        get_schedule(self.schedule)
        for name, known in (
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", LR_SCHEDULES),
            ("ranking", RANKINGS),
        ):
            if getattr(self, name) not in known:
                raise UnknownNameError(name, getattr(self, name), known)
        if isinstance(self.target, str) and "=" not in self.target:
            try:  # "0.05" from a command line: a density
                self.target = float(self.target)
            except ValueError:
                raise ConfigError(
                    f"target must be a number (density) or text like 'macs=0.1', "
                    f"got {self.target!r}"
                ) from None
        Target.parse(self.target)
        check_device(self.device)
        if self.recipe is not None:
            get_recipe(self.recipe)
        if self.step_fraction is not None:  # the paper's rule: a fixed share of filters per step
            from ..pruning.schedules import steps_for

            self.steps = steps_for(self.step_fraction, Target.parse(self.target).level)
        check_method_options(self)  # adapter options the method takes, pruner settings

    # -- derived -----------------------------------------------------------------------------
    @property
    def prunes(self) -> bool:
        """Whether this run prunes (every method but ``finetune``, when ``steps > 0``)."""
        return self.method != "finetune" and self.steps > 0

    @property
    def prunes_blocks(self) -> bool:
        """Whether this run prunes blocks during training (``pruner``, or inferred: blocks for
        an adapter with block masks, such as ``splopa``)."""
        return self.prunes and pruner_granularity(self) == "blocks"

    @property
    def adapter(self) -> str | None:
        """The adapter name, or ``None`` for the baselines."""
        return None if self.method in BASELINE_METHODS else self.method

    @property
    def name(self) -> str:
        """A short name for the run, used as its folder inside a grid."""
        parts = [self.method]
        if self.prunes:
            target = self.target if isinstance(self.target, str) else f"d{self.target:g}"
            criterion = self.block_criterion if self.prunes_blocks else self.criterion
            parts += [criterion, str(target).replace("=", "")]
        return "-".join([*parts, f"s{self.seed}"])

    # -- conversion ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """A config from a mapping of field names; a ``recipe`` key applies that preset first,
        every other key overrides it."""
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "config")
        return cls(**_with_recipe(data))

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> RunConfig:
        """The recipe ``name`` (see :func:`recipes`) with ``overrides`` winning, e.g.
        ``RunConfig.from_recipe("paper", method="splora", target=0.1)`` (18 pruning steps)."""
        return cls.from_dict({**overrides, "recipe": name})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> RunConfig:
        """A validated copy with ``changes`` (unknown keys are refused as in ``from_dict``).
        A new ``recipe`` applies its preset over the current values before ``changes``; a
        ``steps`` among the changes stops its derivation from the target (``step_fraction``)."""
        current = self.to_dict()
        recipe = changes.get("recipe")
        if recipe is not None and recipe != self.recipe:
            current.update(get_recipe(recipe).values)
        if "steps" in changes and "step_fraction" not in changes:
            changes = {**changes, "step_fraction": None}
        return type(self).from_dict({**current, **changes})


def _with_recipe(data: dict) -> dict:
    """``data`` over its recipe's preset (``data`` unchanged without a ``recipe`` key)."""
    name = data.get("recipe")
    if name is None:
        return dict(data)
    merged = {**get_recipe(name).values, **data}
    if "steps" in data and "step_fraction" not in data:
        merged["step_fraction"] = None  # steps given explicitly: no derivation
    return merged


#: Grid keys: lists whose product gives the runs.
GRID_KEYS = {"methods": "method", "criteria": "criterion", "densities": "target", "seeds": "seed"}


@dataclass
class GridConfig:
    """A base run and the lists to sweep: ``methods x criteria x densities x seeds``.

    An empty list keeps the base's value. ``finetune`` neither prunes nor scores, so it gives
    one run per seed. Each run writes into ``<base.output_dir>/<run name>``.
    """

    base: RunConfig = field(default_factory=RunConfig)
    methods: list[str] = field(default_factory=list)
    criteria: list[str] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def __post_init__(self):
        for key in GRID_KEYS:
            value = getattr(self, key)
            if not isinstance(value, list | tuple):
                raise ConfigError(f"grid key {key!r} must be a list, got {value!r}")
            setattr(self, key, list(value))
        self.runs()  # validates every point

    @classmethod
    def from_dict(cls, data: dict) -> GridConfig:
        known = [*GRID_KEYS, *(f.name for f in dataclasses.fields(RunConfig))]
        check_keys(data, known, "grid config")
        base = RunConfig.from_dict({k: v for k, v in data.items() if k not in GRID_KEYS})
        return cls(base=base, **{k: data[k] for k in GRID_KEYS if k in data})

    def to_dict(self) -> dict:
        return {**self.base.to_dict(), **{k: list(getattr(self, k)) for k in GRID_KEYS}}

    def runs(self) -> list[RunConfig]:
        """Every run of the grid, each validated, without duplicates, in a stable order."""
        axes = [getattr(self, k) or [getattr(self.base, GRID_KEYS[k])] for k in GRID_KEYS]
        out: dict[str, RunConfig] = {}
        for method, criterion, density, seed in itertools.product(*axes):
            if isinstance(density, bool) or not isinstance(density, int | float | str):
                raise ConfigError(f"densities must hold numbers, got {density!r}")
            run = self.base.replace(method=method, criterion=criterion, target=density, seed=seed)
            if not run.prunes:  # criterion and density do not matter
                run = run.replace(criterion=self.base.criterion, target=self.base.target)
            run = run.replace(output_dir=str(Path(self.base.output_dir) / run.name))
            out.setdefault(run.name, run)
        return list(out.values())
