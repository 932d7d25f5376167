"""GET /v1/fine_tuning/methods: per method type, the hyperparameters a job accepts, each with the trainer's
documented default and reason. Read from artifacts/finetune_methods.json, which tools/build_finetune_methods.py
generates from train's config (serving does not import train); a test keeps the two in sync."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any


@lru_cache(maxsize=1)
def methods() -> dict[str, Any]:
    doc = json.loads((resources.files("artifacts") / "finetune_methods.json").read_text(encoding="utf-8"))
    return {"object": "list", "data": [{"type": t, **v} for t, v in sorted(doc.items())]}


def routes(app, respond) -> None:
    app.add_url_rule("/v1/fine_tuning/methods", "jobs_methods", lambda: respond(methods()), methods=["GET"])
