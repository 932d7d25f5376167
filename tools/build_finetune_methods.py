"""Writes artifacts/finetune_methods.json: per fine-tuning API method, the hyperparameters POST
/v1/fine_tuning/jobs accepts, each with the train config's own default and its documented reason.

Serving may not import train (the import contract), so the document is generated here from train's config
and shipped as package data; tests/serve/test_finetune_methods.py fails when it is out of sync.

    python tools/build_finetune_methods.py            # rewrite the document
    python tools/build_finetune_methods.py --check    # exit 1 if it differs
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from serve.finetune.api import METHODS
from train.config import load_config

OUT = Path(__file__).resolve().parents[1] / "artifacts" / "finetune_methods.json"
# API hyperparameter -> (config section, field, JSON type); learning_rate_multiplier scales training.lr
FIELDS = {"n_epochs": ("training", "epochs", "integer"), "batch_size": ("training", "batch_size", "integer"),
          "learning_rate_multiplier": ("training", "lr", "number"), "beta": ("method", "beta", "number")}
ONLY = {"beta": {"dpo"}}  # API type -> where the hyperparameter exists


def _reason(section, name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(section) if f.name == name)


def document() -> dict:
    out = {}
    for api_type, method in METHODS.items():
        cfg = load_config(None, [f"method.name={method}"])
        params = {}
        for hp, (section, name, kind) in FIELDS.items():
            if hp in ONLY and api_type not in ONLY[hp]:
                continue
            sec = getattr(cfg, section)
            value, reason = getattr(sec, name), _reason(sec, name)
            if hp == "learning_rate_multiplier":
                params[hp] = {"type": kind, "default": 1.0, "config": f"{section}.{name}", "config_default": value,
                              "reason": f"scales {section}.{name} = {value:g} ({reason})"}
            else:
                value = int(value) if kind == "integer" and float(value).is_integer() else value  # epochs: 3.0 -> 3
                params[hp] = {"type": kind, "default": value, "config": f"{section}.{name}", "reason": reason}
        out[api_type] = {"training_method": method, "hyperparameters": params}
    return out


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.is_file() and OUT.read_text(encoding="utf-8") == text else 1)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
