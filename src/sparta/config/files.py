"""Config files: YAML, TOML or JSON, read into and written from the configs."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .recipes import get_recipe
from .run import GRID_KEYS, GridConfig, RunConfig


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


def resolve_config(
    path=None, overrides: dict | None = None, grid: dict | None = None
) -> RunConfig | GridConfig:
    """The config file at ``path`` (:func:`load_config`) or the defaults, with ``overrides``
    applied to the (base) run and ``grid`` lists replacing the file's (as ``sparta run CONFIG
    --field value`` does). A ``recipe`` among the overrides comes first: recipe, then the
    file's keys, then the other overrides."""
    data = read_config_file(path) if path is not None else {}
    overrides, grid = dict(overrides or {}), dict(grid or {})
    if "recipe" in overrides:
        data = {**data, "recipe": overrides.pop("recipe")}
    config = config_from_dict(data)
    if isinstance(config, GridConfig):
        lists = {k: getattr(config, k) for k in GRID_KEYS} | grid
        return GridConfig(base=config.base.replace(**overrides), **lists)
    config = config.replace(**overrides)
    return GridConfig(base=config, **grid) if grid else config


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
