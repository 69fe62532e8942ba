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

The package: :mod:`~sparta.config.run` (the two dataclasses), :mod:`~sparta.config.recipes`
(the presets), :mod:`~sparta.config.checks` (validation of values and keys) and
:mod:`~sparta.config.files` (reading and writing files); everything public is importable from
``sparta.config``.
"""

from .files import (
    config_from_dict,
    load_config,
    read_config_file,
    resolve_config,
    save_config,
)
from .recipes import PAPER, RECIPES, Recipe, get_recipe, recipes
from .run import (
    BASELINE_METHODS,
    GRID_KEYS,
    LR_SCHEDULES,
    OPTIMIZERS,
    RANKINGS,
    GridConfig,
    RunConfig,
    methods,
)

__all__ = [
    "BASELINE_METHODS",
    "GRID_KEYS",
    "GridConfig",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PAPER",
    "RANKINGS",
    "RECIPES",
    "Recipe",
    "RunConfig",
    "config_from_dict",
    "get_recipe",
    "load_config",
    "methods",
    "read_config_file",
    "recipes",
    "resolve_config",
    "save_config",
]
