"""sha256 of files and of model folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

# Files that define a model's identity; tokenizer/README edits do not change it.
WEIGHT_SUFFIXES = (".safetensors",)
IDENTITY_FILES = ("config.json",)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: Path | str) -> str:
    """Identity of a model folder: sha256 over (relative path, sha256) of its weights and config."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts)
        and (p.suffix in WEIGHT_SUFFIXES or p.name in IDENTITY_FILES))
    if not files:
        raise FileNotFoundError(f"{root}: no weight files (*.safetensors) found")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def file_checksums(root: Path | str) -> dict[str, str]:
    """sha256 of every file under root, keyed by posix relative path."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}
