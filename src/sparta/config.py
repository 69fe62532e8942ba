"""Typed experiment configuration: one run (:class:`RunConfig`) and a grid of runs
(:class:`GridConfig`), read from YAML or TOML files and validated on construction.

Validation follows the library's error style (design.md, rule 6): an unknown key names the key
and the closest known one; an out-of-range value says what was received and what range is
accepted. Every error is a :class:`~sparta.errors.ConfigError` (a ``ValueError``).

A config file is flat: ``key: value`` pairs with the field names of :class:`RunConfig`. A grid
file adds the list keys ``methods``, ``criteria``, ``densities`` and ``seeds``; every other key
is the base run every grid point starts from.

A ``recipe`` key (``recipe: paper``) names a preset of values (:data:`RECIPES`, listed by
:func:`recipes`): the preset is applied first and every other key of the file (or flag of
``sparta run``) overrides it.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnknownNameError

#: Methods that are not adapters: full fine-tuning and the fine-pruning baseline.
BASELINE_METHODS = ("finetune", "fine-pruning")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("cosine", "constant", "step")
RANKINGS = ("global", "local")


@dataclass(frozen=True)
class Recipe:
    """A named preset of :class:`RunConfig` values, each with the reason it has that value."""

    name: str
    summary: str
    choices: dict  # field -> (value, reason)

    @property
    def values(self) -> dict:
        return {k: v for k, (v, _) in self.choices.items()}

    def describe(self) -> str:
        lines = [f"{self.name}: {self.summary}"]
        lines += [f"  {k} = {v!r}: {why}" for k, (v, why) in self.choices.items()]
        return "\n".join(lines)


#: The paper's research protocol (Hedegaard et al., Sec. 4 and appendix). It is the same for
#: every method: fine-pruning and the adapters get the same epochs, pruning steps, data split and
#: schedule; only ``adapter_lr_scale`` differs in effect, as it touches adapter parameters alone.
PAPER = Recipe(
    "paper",
    "Hedegaard et al.'s protocol: SGD with momentum and weight decay, step learning rate, "
    "adapters at a higher rate, iterative global pruning of 5% of the filters per step, "
    "hyper-parameters chosen on a validation split of the training data",
    {
        "optimizer": ("sgd", "the paper trains every method with SGD"),
        "momentum": (0.9, "the paper's SGD momentum"),
        "weight_decay": (5e-4, "the paper's weight decay"),
        "lr": (
            0.003,
            "chosen on a validation split (ImageNet MobileNetV2 -> 900 Fashion-MNIST images at "
            "32 px, 3 epochs, seed 0): fine-tuning val 0.73 at 0.003 vs 0.70 at 0.01, and at "
            "0.01 the adapters' 10x (0.1) was unstable (val 0.33)",
        ),
        "lr_schedule": ("step", "the paper's step decay: lr / 10 at 50% and 75% of each phase"),
        "adapter_lr_scale": (
            10.0,
            "the paper trains SPLoRA at a much higher rate than fine-tuning (its ViT runs: "
            "0.1875 vs 0.00625, 30x); on the same validation split, pruned to 30% of the "
            "filters with 1 recovery epoch per step, SPLoRA kept val 0.67 at 10x vs 0.35 at 1x",
        ),
        "init_scale": (1e-4, "adapters start as a tiny perturbation, uniform(+-1e-4)"),
        "ranking": ("global", "filters are ranked globally after per-layer normalisation"),
        "schedule": ("linear", "equal amounts per step"),
        "step_fraction": (
            0.05,
            "each step removes 5% of the original filter count: steps = round((1 - density) / "
            "0.05), e.g. 14 steps to 30% and 18 to 10% filter density",
        ),
        "epochs": (10, "initial training before pruning (the same for every method)"),
        "recovery_epochs": (
            1,
            "training after every pruning step; the paper used 20-50 on CIFAR/Flowers, which "
            "is far beyond a CPU budget; raise it when time allows",
        ),
        "val_fraction": (
            0.1,
            "10% of the training data is held out as a validation split: choose "
            "hyper-parameters on val_accuracy, never on the test accuracy",
        ),
    },
)

#: Every named recipe.
RECIPES: dict[str, Recipe] = {PAPER.name: PAPER}


def recipes() -> dict[str, Recipe]:
    """Every named recipe (``RunConfig.from_recipe(name)``, ``recipe: name`` in a config file,
    ``sparta run --recipe name``)."""
    return dict(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name lists the known ones."""
    if name not in RECIPES:
        raise UnknownNameError("recipe", name, RECIPES)
    return RECIPES[name]


def methods() -> list[str]:
    """Every accepted ``method``: the baselines and every registered adapter."""
    from .adapters import list_adapters

    return [*BASELINE_METHODS, *list_adapters()]


def _spec(default, kind, *, low=None, high=None, open_low=False, open_high=False, none=False):
    """A dataclass field with its validation rule in ``metadata``."""
    rule = dict(kind=kind, low=low, high=high, open_low=open_low, open_high=open_high, none=none)
    return field(default=default, metadata=rule)


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

    recipe: str | None = _spec(None, str, none=True)  # a preset applied first (RECIPES)
    # model
    model: str = _spec("resnet18", str)
    weights: str | None = _spec(None, str, none=True)  # e.g. "DEFAULT": pretrained weights
    checkpoint: str | None = _spec(None, str, none=True)  # a local state dict to start from
    cifar_stem: bool = _spec(False, bool)
    # data
    dataset: str = _spec("cifar10", str)
    data_dir: str = _spec("data", str)
    download: bool = _spec(False, bool)
    image_size: int | None = _spec(None, int, low=1, none=True)
    # method
    method: str = _spec("splora", str)
    rank: int = _spec(8, int, low=1)  # adapters that take a rank (splora)
    init_scale: float | None = _spec(None, float, low=0, high=1, none=True)  # None: adapter's
    # pruning
    criterion: str = _spec("taylor", str)
    target: str | float = _spec(0.05, (str, float))  # filter density, or "sparsity=0.9" text
    steps: int = _spec(19, int, low=0)  # 0: no pruning
    step_fraction: float | None = _spec(None, float, low=0, high=1, open_low=True, none=True)
    schedule: str = _spec("linear", str)
    ranking: str = _spec("global", str)
    round_to: int | None = _spec(None, int, low=1, none=True)
    scoring_batches: int = _spec(16, int, low=1)
    # training
    epochs: int = _spec(10, int, low=0)  # initial training
    recovery_epochs: int = _spec(1, int, low=0)  # after every pruning step
    batch_size: int = _spec(64, int, low=1)  # global batch, split over ranks
    optimizer: str = _spec("sgd", str)
    lr: float = _spec(0.01, float, low=0, open_low=True)
    weight_decay: float = _spec(0.0, float, low=0)
    momentum: float = _spec(0.9, float, low=0, high=1, open_high=True)
    lr_schedule: str = _spec("cosine", str)
    adapter_lr_scale: float = _spec(1.0, float, low=0, open_low=True)
    val_fraction: float = _spec(0.0, float, low=0, high=1, open_high=True)
    # run
    seed: int = _spec(0, int, low=0)
    output_dir: str = _spec("runs/run", str)
    device: str = _spec("auto", str)
    workers: int = _spec(0, int, low=0)
    find_unused_parameters: bool = _spec(False, bool)  # DDP; see sparta.train.distributed
    sync_batchnorm: bool = _spec(False, bool)  # DDP on CUDA only

    def __post_init__(self):
        _check_fields(self)
        self._check_names()

    def _check_names(self) -> None:
        from .pruning.importance import get_criterion
        from .pruning.pruner import Target
        from .pruning.schedules import get_schedule

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
        _check_device(self.device)
        if self.recipe is not None:
            get_recipe(self.recipe)
        if self.step_fraction is not None:  # the paper's rule: a fixed share of filters per step
            from .pruning.schedules import steps_for

            self.steps = steps_for(self.step_fraction, Target.parse(self.target).level)

    # -- derived -----------------------------------------------------------------------------
    @property
    def prunes(self) -> bool:
        """Whether this run prunes (every method but ``finetune``, when ``steps > 0``)."""
        return self.method != "finetune" and self.steps > 0

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
            parts += [self.criterion, str(target).replace("=", "")]
        return "-".join([*parts, f"s{self.seed}"])

    # -- conversion ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """A config from a mapping of field names; a ``recipe`` key applies that preset first,
        every other key overrides it."""
        _check_keys(data, [f.name for f in dataclasses.fields(cls)], "config")
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
        _check_keys(data, known, "grid config")
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


# -- files -----------------------------------------------------------------------------------------
def read_config_file(path) -> dict:
    """The flat mapping in a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(
                f"config file {str(path)!r}: unknown extension {suffix!r}; "
                "use .yaml, .yml, .toml or .json"
            )
    except ConfigError:
        raise
    except Exception as exc:  # each parser has its own error types
        raise ConfigError(f"cannot parse config file {str(path)!r}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}"
        )
    return data


def load_config(path) -> RunConfig | GridConfig:
    """A :class:`GridConfig` if the file has any grid key, else a :class:`RunConfig`."""
    return config_from_dict(read_config_file(path))


def config_from_dict(data: dict) -> RunConfig | GridConfig:
    """A :class:`GridConfig` if ``data`` has any grid key, else a :class:`RunConfig`."""
    if any(k in data for k in GRID_KEYS):
        return GridConfig.from_dict(data)
    return RunConfig.from_dict(data)


def save_config(config: RunConfig | GridConfig, path) -> Path:
    """Write ``config`` as YAML, TOML or JSON (by extension). ``None`` values are left out (they
    are the defaults of every optional field), so loading the file gives back ``config``; a
    ``None`` over a value of the config's recipe is kept (YAML/JSON ``null``), as leaving it out
    would bring the recipe's value back (TOML has no null: such a config is refused)."""
    path = Path(path)
    data = config.to_dict()
    preset = get_recipe(data["recipe"]).values if data.get("recipe") else {}
    data = {k: v for k, v in data.items() if v is not None or preset.get(k) is not None}
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    elif suffix == ".toml":
        text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in data.items())
    elif suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        raise ConfigError(f"cannot write config as {suffix!r}; use .yaml, .toml or .json")
    path.write_text(text, encoding="utf-8")
    return path


def _toml_value(value) -> str:
    if value is None:
        raise ConfigError(
            "TOML cannot write a None that overrides a value of the config's recipe; "
            "save it as .yaml or .json"
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML")


# -- validation --------------------------------------------------------------------------------
def _check_keys(data, known: list[str], what: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of keys, got {type(data).__name__}")
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(
                f"unknown {what} key {key!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; known keys: {', '.join(sorted(known))}"
            )


def _check_fields(config) -> None:
    for f in dataclasses.fields(config):
        rule = f.metadata
        if not rule:
            continue
        value = getattr(config, f.name)
        setattr(config, f.name, _check_value(f.name, value, **rule))


def _check_value(name, value, kind, low, high, open_low, open_high, none) -> Any:
    if value is None:
        if none:
            return None
        raise ConfigError(f"{name} must be set, got None")
    kinds, given = (kind if isinstance(kind, tuple) else (kind,)), value
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = any(
        isinstance(value, k) and not (k is not bool and isinstance(value, bool)) for k in kinds
    )
    if not ok:
        expected = " or ".join({str: "text", int: "an integer", float: "a number",
                                bool: "true/false"}[k] for k in kinds)  # fmt: skip
        raise ConfigError(f"{name} must be {expected}, got {given!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {given!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        below = low is not None and (value <= low if open_low else value < low)
        above = high is not None and (value >= high if open_high else value > high)
        if below or above:
            bounds = _range(low, high, open_low, open_high)
            raise ConfigError(f"{name} must be {bounds}, got {given!r}")
    return value


def _range(low, high, open_low, open_high) -> str:
    if high is None:
        return f"{'>' if open_low else '>='} {low}"
    return f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


def _check_device(device: str) -> None:
    head, _, index = device.partition(":")
    if head not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise ConfigError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps', got {device!r}"
        )
    if index and head != "cuda":
        raise ConfigError(f"only cuda devices take an index, got {device!r}")
