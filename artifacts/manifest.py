"""manifest.json: what a run (or a registered artifact) is, where it came from, and its checksums."""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from artifacts.atomic import atomic_write_text
from artifacts.checksums import sha256_file

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
_TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers")


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not match the files beside it."""


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def jsonable(obj: Any) -> Any:
    """Plain JSON types: sets become sorted lists, enums their value (peft configs hold both)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(jsonable(v) for v in obj)
    if hasattr(obj, "value") and type(obj).__module__ != "builtins":
        return obj.value
    return obj


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """One manifest schema for runs and registry entries. Paths in `files` are relative to the manifest's folder."""

    kind: str  # "run" | "adapter" | "base"
    method: str | None = None  # lora, dora, ia3, prompt_tuning, full; None for a base model
    base_model: dict[str, Any] = field(default_factory=dict)  # name, source, sha256, architecture, vocab_size
    peft_config: dict[str, Any] | None = None  # adapter_config.json content (rank, alpha, target modules...)
    dataset: dict[str, Any] = field(default_factory=dict)  # per split: path, sha256, row counts, cleaning counts
    metrics: dict[str, Any] = field(default_factory=dict)  # headline numbers from eval.json
    servability: dict[str, Any] = field(default_factory=dict)  # per backend: ok, reasons, required settings
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, every weight/artifact file
    versions: dict[str, str] = field(default_factory=library_versions)
    created_at: str = field(default_factory=utc_now)
    name: str | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific additions (export results, ...)

    def to_json(self) -> str:
        return json.dumps(jsonable(dataclasses.asdict(self)), indent=2, sort_keys=False) + "\n"

    def write(self, folder: Path | str) -> Path:
        path = Path(folder) / MANIFEST_NAME
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def read(cls, folder: Path | str) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest (is this a finished run?)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: not valid JSON: {e}") from e
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ManifestError(f"{path}: unknown fields {sorted(unknown)}")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(f"{path}: schema_version {raw.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        try:
            return cls(**raw)
        except TypeError as e:
            raise ManifestError(f"{path}: {e}") from e

    def record_files(self, folder: Path | str, relpaths: list[str]) -> None:
        folder = Path(folder)
        for rel in relpaths:
            self.files[rel] = sha256_file(folder / rel)

    def verify_files(self, folder: Path | str, prefix: str = "") -> None:
        """Raise ManifestError if any recorded file under `prefix` is missing or differs."""
        folder = Path(folder)
        checked = 0
        for rel, digest in self.files.items():
            if not rel.startswith(prefix):
                continue
            p = folder / rel
            if not p.is_file():
                raise ManifestError(f"{p}: listed in the manifest but missing")
            if sha256_file(p) != digest:
                raise ManifestError(f"{p}: sha256 does not match the manifest (corrupt or modified)")
            checked += 1
        if prefix and checked == 0:
            raise ManifestError(f"{folder}: manifest lists no files under {prefix!r}")
