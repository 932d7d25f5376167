"""Results that depend only on their inputs, kept on disk under a key of those inputs.

A base model's greedy replies to the retention set and its scores on a run's held-out data are the
same for every run on that base with that data: computed once, then read back. The key hashes every
input (weights' sha256, template, data, generation settings) and the source of the code that computes
the result, so a change to the scoring code recomputes instead of comparing old base scores with new
tuned ones. A file whose checksum does not match is recomputed and rewritten, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, TypeVar

from artifacts import atomic_write_text

T = TypeVar("T")


def input_key(*parts: Any) -> str:
    """sha256 of the JSON of the parts (lists, dicts, strings, numbers: anything else is refused)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def code_fingerprint(*modules: ModuleType) -> str:
    """sha256 of the modules' source files: part of a key whose value that code computes."""
    h = hashlib.sha256()
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()


def cached(folder: Path, key: str, compute: Callable[[], T]) -> T:
    """compute()'s JSON-able value, read from folder/<key>.json when a valid copy is there."""
    path = folder / f"{key[:32]}.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        body = json.dumps(raw.get("value"), sort_keys=True)
        if raw.get("key") == key and raw.get("sha256") == hashlib.sha256(body.encode()).hexdigest():
            return raw["value"]
    value = compute()
    body = json.dumps(value, sort_keys=True)
    atomic_write_text(path, json.dumps({"key": key, "sha256": hashlib.sha256(body.encode()).hexdigest(),
                                        "value": value}))
    return value
