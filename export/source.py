"""What an export command reads: a run, a merged/full model folder, or a plain HF base folder.

Every input is checked before any output is written: it exists, its manifest checksums match the
files (a corrupt weight file is refused), its base model is the one given, and its architecture is
one the ONNX exporter supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from artifacts import Manifest, ManifestError, RunDir, tree_sha256
from export.errors import ExportError
from lm.architectures import read_model_type, supported

SUPPORTED_MODEL_TYPES = supported("onnx")  # the one list: lm/architectures.py


@dataclass
class Source:
    model_dir: Path  # HF folder with full weights (config.json + *.safetensors + tokenizer)
    run: Path | None = None  # the training run it came from, if any (validation data for quality reports)
    manifest: Manifest | None = None  # the model folder's manifest (None for a plain base folder)
    base_model: dict = field(default_factory=dict)


def model_type(model_dir: Path) -> str:
    try:
        return read_model_type(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(str(e)) from None


def check_architecture(model_dir: Path) -> str:
    mt = model_type(model_dir)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ExportError(f"{model_dir / 'config.json'}: model_type {mt!r} is not supported by the ONNX export "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return mt


def read_verified(folder: Path) -> Manifest:
    """The folder's manifest after re-hashing every file it lists."""
    try:
        m = Manifest.read(folder)
        m.verify_files(folder)
    except ManifestError as e:
        raise ExportError(str(e)) from None
    return m


def check_base(manifest: Manifest, base: str | Path | None) -> Path:
    """The base model folder an adapter run needs; a given `base` must have the checksum it was trained on."""
    path = Path(base) if base else Path(manifest.base_model.get("path", ""))
    if not (path / "config.json").is_file():
        raise ExportError(f"{path}: base model folder not found (pass --base DIR)")
    want = manifest.base_model.get("sha256")
    if want:
        try:
            have = tree_sha256(path)
        except FileNotFoundError as e:
            raise ExportError(str(e)) from None
        if have != want:
            raise ExportError(f"{path}: base model sha256 {have[:12]} does not match the adapter's base "
                              f"{manifest.base_model.get('name')!r} ({want[:12]})")
    return path


def resolve_source(src: Path | str) -> Source:
    """A model folder ready to export: a run's model/ (merged or full), a manifest'd model folder, or a base."""
    src = Path(src)
    if not src.exists():
        raise ExportError(f"{src}: no such run or model folder")
    if not src.is_dir():
        raise ExportError(f"{src}: not a directory")
    rd = RunDir(src)
    if rd.manifest.is_file():
        m = read_verified(src)
        if m.kind == "run":
            if not rd.model.is_dir():
                raise ExportError(f"{src}: the run has no merged model yet; run: tunestack export merge {src}")
            mm = read_verified(rd.model) if (rd.model / "manifest.json").is_file() else m
            check_architecture(rd.model)
            return Source(rd.model, run=src, manifest=mm, base_model=m.base_model)
        run = Path(m.extra["merged_from"]) if m.extra.get("merged_from") else (
            Path(m.extra["run"]) if m.extra.get("run") else None)
        check_architecture(src)
        return Source(src, run=run if run and run.is_dir() else None, manifest=m, base_model=m.base_model)
    check_architecture(src)
    return Source(src, base_model={"name": src.resolve().name, "path": str(src.resolve())})
