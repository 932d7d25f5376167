"""Model registry: the directory serving reads. One base model plus any number of named adapters.

    <root>/
      base/<name>/          HF model folder + manifest.json (kind=base)
      adapters/<name>/      adapter_config.json, adapter_model.safetensors, manifest.json (kind=adapter)
      models/<name>/        full-weight models (full fine-tuning, merged, exported) + manifest.json

Entries appear and disappear only by rename, so a reader sees a complete entry or none.
Names are plain identifiers: never paths.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from artifacts.atomic import atomic_dir
from artifacts.checksums import file_checksums, sha256_file, tree_sha256
from artifacts.manifest import MANIFEST_NAME, Manifest, ManifestError
from artifacts.run_dir import RunDir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KINDS = ("base", "adapters", "models")


class RegistryError(ValueError):
    """A publish/lookup was refused; the message says why."""


def validate_name(name: str) -> str:
    """Adapter/model names are identifiers, never paths: no '/', no '..', no absolute paths."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise RegistryError(
            f"invalid name {name!r}: use 1-64 of [A-Za-z0-9._-], starting with a letter or digit, no '..'")
    return name


def _verified_digests(verified: dict[str, str], prefix: str, tmp: Path) -> dict[str, str]:
    """Checksums of the entry being written, taken from the source manifest just verified (so a publish
    hashes each file once); only a file that manifest does not list is hashed here."""
    out = {}
    for p in sorted(tmp.rglob("*")):
        rel = p.relative_to(tmp).as_posix()
        if p.is_file() and rel != MANIFEST_NAME:
            out[rel] = verified.get(prefix + rel) or sha256_file(p)
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same filesystem: instant and no extra space; weights are never modified in place
    except OSError:
        shutil.copy2(src, dst)


class Registry:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    # -- lookup ---------------------------------------------------------------
    def path(self, kind: str, name: str) -> Path:
        if kind not in KINDS:
            raise RegistryError(f"unknown registry kind {kind!r}")
        p = (self.root / kind / validate_name(name)).resolve()
        if p.parent != (self.root / kind).resolve():
            raise RegistryError(f"{name!r} escapes the registry")
        return p

    def names(self, kind: str) -> list[str]:
        d = self.root / kind
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file())

    def adapters(self) -> list[str]:
        return self.names("adapters")

    def base(self) -> tuple[str, Path] | None:
        names = self.names("base")
        if len(names) > 1:
            raise RegistryError(f"{self.root}/base holds {len(names)} base models; a registry serves one")
        return (names[0], self.root / "base" / names[0]) if names else None

    def manifest(self, kind: str, name: str) -> Manifest:
        return Manifest.read(self.path(kind, name))

    # -- publish ----------------------------------------------------------------
    def register_base(self, model_dir: Path | str, name: str, sha256: str | None = None) -> Path:
        """Put a base model folder into the registry (hard links where possible). Idempotent."""
        model_dir = Path(model_dir)
        sha256 = sha256 or tree_sha256(model_dir)
        current = self.base()
        if current is not None:
            cur = Manifest.read(current[1])
            if cur.base_model.get("sha256") == sha256:
                return current[1]
            raise RegistryError(
                f"{self.root} already serves base {current[0]!r} (sha256 {cur.base_model.get('sha256', '?')[:12]}); "
                f"refusing a second, different base {name!r} ({sha256[:12]})")
        with atomic_dir(self.path("base", name)) as tmp:
            for p in sorted(model_dir.rglob("*")):
                rel = p.relative_to(model_dir)
                if p.is_file() and not any(s.startswith(".") for s in rel.parts) and rel.name != MANIFEST_NAME:
                    _link_or_copy(p, tmp / rel)
            m = Manifest(kind="base", name=name, base_model={"name": name, "source": str(model_dir), "sha256": sha256})
            m.files = file_checksums(tmp)
            m.write(tmp)
        return self.path("base", name)

    def publish_run(self, run: Path | str, name: str, *, replace: bool = False) -> Path:
        """Publish a finished run's adapter (or full model) atomically; registers the base if needed."""
        run_dir = RunDir(Path(run))
        validate_name(name)
        try:
            rm = Manifest.read(run_dir.root)
        except ManifestError as e:
            raise RegistryError(str(e)) from e
        if rm.kind != "run":
            raise RegistryError(f"{run_dir.root}: manifest kind is {rm.kind!r}, expected 'run'")
        try:
            rm.verify_files(run_dir.root)
        except ManifestError as e:
            raise RegistryError(f"refusing to publish: {e}") from e
        kind, src = ("adapters", run_dir.adapter) if run_dir.adapter.is_dir() else ("models", run_dir.model)
        if not src.is_dir():
            raise RegistryError(f"{run_dir.root}: has neither adapter/ nor model/ to publish")
        base = rm.base_model
        if kind == "adapters":
            src_base = Path(base.get("path", ""))
            current = self.base()
            if current is None:
                if not src_base.is_dir():
                    raise RegistryError(f"registry has no base model and the run's base {src_base} is not on disk")
                self.register_base(src_base, base["name"], base["sha256"])
            else:
                have = Manifest.read(current[1]).base_model.get("sha256")
                if have != base.get("sha256"):
                    raise RegistryError(
                        f"adapter {name!r} was trained on base sha256 {str(base.get('sha256'))[:12]}, "
                        f"but the registry serves {current[0]!r} ({str(have)[:12]})")
        target = self.path(kind, name)
        if target.exists() and not replace:
            raise RegistryError(f"{kind}/{name} already exists in {self.root} (use replace to overwrite)")
        with atomic_dir(target, replace=replace) as tmp:
            for p in sorted(src.rglob("*")):
                if p.is_file():
                    _link_or_copy(p, tmp / p.relative_to(src))
            files = _verified_digests(rm.files, f"{src.name}/", tmp)
            if run_dir.model_card.is_file():
                (tmp / "README.md").unlink(missing_ok=True)  # may be a hard link into the run: never write through it
                shutil.copy2(run_dir.model_card, tmp / "README.md")
                files["README.md"] = sha256_file(tmp / "README.md")
            m = Manifest(kind=kind.rstrip("s"), name=name, method=rm.method, base_model=base,
                         peft_config=rm.peft_config, dataset=rm.dataset, metrics=rm.metrics,
                         servability=rm.servability, versions=rm.versions,
                         extra={"run": str(run_dir.root.resolve()), "run_created_at": rm.created_at})
            m.files = files
            m.write(tmp)
        return target

    def publish_model(self, folder: Path | str, name: str, *, replace: bool = False) -> Path:
        """Publish an exported model folder (merged, ONNX, int8, TensorRT) into models/<name>, atomically."""
        folder = Path(folder)
        validate_name(name)
        try:
            src = Manifest.read(folder)
            src.verify_files(folder)
        except ManifestError as e:
            raise RegistryError(f"refusing to publish: {e}") from e
        if src.kind != "model":
            raise RegistryError(f"{folder}: manifest kind is {src.kind!r}, expected 'model' (an export)")
        target = self.path("models", name)
        if target.exists() and not replace:
            raise RegistryError(f"models/{name} already exists in {self.root} (use replace to overwrite)")
        with atomic_dir(target, replace=replace) as tmp:
            for p in sorted(folder.rglob("*")):
                rel = p.relative_to(folder)
                if p.is_file() and rel.name != MANIFEST_NAME and not any(s.startswith(".") for s in rel.parts):
                    _link_or_copy(p, tmp / rel)
            src.name = name
            src.extra = {**src.extra, "published_from": str(folder.resolve())}
            src.files = _verified_digests(src.files, "", tmp)
            src.write(tmp)
        return target

    def unpublish(self, kind: str, name: str) -> None:
        """Remove an entry atomically (rename out of sight, then delete)."""
        p = self.path(kind, name)
        if not p.is_dir():
            raise RegistryError(f"{kind}/{name} is not in {self.root}")
        trash = p.parent / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def verify(self, kind: str, name: str) -> Manifest:
        """Manifest of an entry after checking every file's sha256."""
        p = self.path(kind, name)
        m = Manifest.read(p)
        m.verify_files(p)
        return m
