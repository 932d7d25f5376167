"""What ships inside the train package (configs/, demo_data/) and where a config's relative paths point.

A config argument is a YAML file or the name of a bundled config: `smollm2_lora_chef` is
train/configs/smollm2_lora_chef.yaml of the installed package, so it works from any directory.
Relative data files resolve against where their value came from:
  - written in a config file: that file's folder (a config travels with its data);
  - the defaults: this package (the bundled demo data);
  - a section.field=value override: the working directory, as any command-line path.
Folders a run writes or reads as runs (output.dir, output.registry, method.teacher, method.teacher_cache)
always resolve against the working directory: a bundled config must never write into the package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lm.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent
CONFIGS = PACKAGE / "configs"
# (section, field) of every data file a config names; method.rewards' json_schema:PATH is one too
DATA_FILES = (("data", "train"), ("data", "validation"), ("data", "eval"), ("data", "replay_prompts"),
              ("eval", "retain"))
SCHEMA_REWARD = "json_schema:"


def names() -> list[str]:
    """The bundled configs, by the name the command line takes."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def config_file(arg: str | Path) -> Path:
    """A config argument as a file: a path that exists, else a bundled config's name (with or without .yaml)."""
    path = Path(arg)
    if path.is_file():
        return path
    bundled = CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    raise ConfigError(f"{arg}: config file not found (nor a bundled config: {', '.join(names())})")


def _resolved(value: Any, base: Path) -> Any:
    if not isinstance(value, str) or not value or os.path.isabs(value):
        return value
    return os.path.normpath(base / value)


def _resolved_rewards(rewards: Any, base: Path) -> Any:
    if not isinstance(rewards, list):
        return rewards
    return [SCHEMA_REWARD + _resolved(r[len(SCHEMA_REWARD):], base)
            if isinstance(r, str) and r.startswith(SCHEMA_REWARD) else r for r in rewards]


def resolve_file_paths(raw: dict, config: Path) -> dict:
    """The raw sections of a config file with its relative data files made absolute against its folder."""
    base = config.resolve().parent
    out = {s: dict(v) if isinstance(v, dict) else v for s, v in raw.items()}
    for section, name in DATA_FILES:
        if isinstance(out.get(section), dict) and name in out[section]:
            out[section][name] = _resolved(out[section][name], base)
    if isinstance(out.get("method"), dict) and "rewards" in out["method"]:
        out["method"]["rewards"] = _resolved_rewards(out["method"]["rewards"], base)
    return out


def resolve_defaults(cfg) -> None:
    """Point the config's relative default data files (lm/data/config.py: the demo data) into this package."""
    for section, name in DATA_FILES:
        part = getattr(cfg, section)
        setattr(part, name, _resolved(getattr(part, name), PACKAGE))
