"""Writing an export: a checked working folder becomes `out`, with its manifest, in one rename."""

from __future__ import annotations

import shutil
from pathlib import Path

from artifacts import MANIFEST_NAME, Manifest, atomic_dir
from artifacts.checksums import file_checksums


def copy_side_files(onnx_dir: Path, dst: Path) -> None:
    """Tokenizer, config and generation config travel with a model derived from an ONNX export."""
    for f in onnx_dir.iterdir():
        if f.is_file() and f.name != MANIFEST_NAME and not f.name.startswith("model."):
            shutil.copy2(f, dst / f.name)


def commit(work: Path, out: Path, manifest: Manifest, *, replace: bool) -> None:
    """Move work/* (all but its draft manifest) into `out` atomically; the manifest lists every file's sha256."""
    with atomic_dir(out, replace=replace) as tmp:
        for f in work.iterdir():
            if f.name != MANIFEST_NAME:
                shutil.move(str(f), tmp / f.name)
        manifest.files = file_checksums(tmp)
        manifest.write(tmp)
