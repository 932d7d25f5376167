"""Model registry: the directory serving reads. One base model plus any number of named, versioned adapters.

    <root>/
      base/<name>/          HF model folder + manifest.json (kind=base)
      adapters/<name>@v1/   adapter_config.json, adapter_model.safetensors, README.md, manifest.json (kind=adapter)
      adapters/<name>@v2/   every publish of a name adds a version; versions never change once written
      adapters/<name>       -> <name>@v2: a relative symlink, the version the name serves (latest that passed
                            the gate, or the one a rollback chose); swapped atomically by rename(2)
      models/<name>@vN/, models/<name>   full-weight models (full fine-tuning, merged, exported), versioned alike

Entries appear and disappear only by rename, so a reader sees a complete entry or none. A reader that
lists a kind sees the names and the pinned `name@vN` entries; both are folders with a manifest.
Names are plain identifiers: never paths.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from artifacts.atomic import atomic_dir
from artifacts.checksums import file_checksums, sha256_file, tree_sha256
from artifacts.finetune import loss_at
from artifacts.gate import GatePolicy, GateResult, enforce
from artifacts.manifest import MANIFEST_NAME, Manifest, ManifestError
from artifacts.run_dir import RunDir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSIONED = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})@v(?P<version>[1-9][0-9]{0,5})$")
KINDS = ("base", "adapters", "models")
KEEP_VERSIONS = 5  # enough to roll back a few publishes; adapter versions are small


class RegistryError(ValueError):
    """A publish/lookup was refused; the message says why."""


def validate_name(name: str) -> str:
    """Adapter/model names are identifiers, never paths: no '/', no '..', no absolute paths."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise RegistryError(
            f"invalid name {name!r}: use 1-64 of [A-Za-z0-9._-], starting with a letter or digit, no '..'")
    return name


def split_ref(ref: str) -> tuple[str, int | None]:
    """`chef` -> ("chef", None); `chef@v3` -> ("chef", 3); anything else is refused like a bad name."""
    m = _VERSIONED.match(ref) if isinstance(ref, str) else None
    if m and ".." not in ref:
        return m["name"], int(m["version"])
    return validate_name(ref), None


def version_ref(name: str, version: int) -> str:
    return f"{name}@v{version}"


@dataclass
class Version:
    """One published version of a name."""

    version: int
    path: Path
    serving: bool
    manifest: Manifest | None  # None when unreadable (reported, never served)


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
    def path(self, kind: str, ref: str) -> Path:
        """The folder of `name` (the version it serves) or of a pinned `name@vN`; never outside the registry."""
        if kind not in KINDS:
            raise RegistryError(f"unknown registry kind {kind!r}")
        split_ref(ref)
        p = (self.root / kind / ref).resolve()
        if p.parent != (self.root / kind).resolve():
            raise RegistryError(f"{ref!r} escapes the registry")
        return p

    def names(self, kind: str, versions: bool = True) -> list[str]:
        """Servable entries of a kind: every name and, with `versions`, every pinned `name@vN`."""
        d = self.root / kind
        if not d.is_dir():
            return []
        with os.scandir(d) as entries:  # os-level calls: a server lists 1,000s of entries every poll
            return sorted(e.name for e in entries
                          if not e.name.startswith(".") and (versions or "@" not in e.name)
                          and e.is_dir() and os.path.isfile(os.path.join(e.path, MANIFEST_NAME)))

    def adapters(self) -> list[str]:
        """Adapter names (each serves one version); `names("adapters")` adds the pinned `name@vN`."""
        return self.names("adapters", versions=False)

    def base(self) -> tuple[str, Path] | None:
        names = self.names("base")
        if len(names) > 1:
            raise RegistryError(f"{self.root}/base holds {len(names)} base models; a registry serves one")
        return (names[0], self.root / "base" / names[0]) if names else None

    def manifest(self, kind: str, ref: str) -> Manifest:
        return Manifest.read(self.path(kind, ref))

    def serving_version(self, kind: str, name: str) -> int | None:
        """The version `name` points at; None for an unversioned entry (published before versions existed)."""
        link = self.root / kind / validate_name(name)
        if not link.is_symlink():
            return None
        return split_ref(os.readlink(link))[1]

    def versions(self, kind: str, name: str) -> list[Version]:
        """Every kept version of `name`, oldest first, with the one the name serves marked."""
        validate_name(name)
        d, serving = self.root / kind, self.serving_version(kind, name)
        out = []
        for p in sorted(d.glob(f"{name}@v*")) if d.is_dir() else []:
            ref = split_ref(p.name) if _VERSIONED.match(p.name) else (None, None)
            if ref[0] != name or not (p / MANIFEST_NAME).is_file():
                continue
            try:
                m = Manifest.read(p)
            except ManifestError:
                m = None
            out.append(Version(ref[1], p, ref[1] == serving, m))
        return sorted(out, key=lambda v: v.version)

    # -- versions -----------------------------------------------------------------
    def _point(self, kind: str, name: str, version: int) -> None:
        """Make `name` serve `version`: one rename of a fresh symlink over the old one (atomic for readers)."""
        link = self.root / kind / name
        if link.exists() and not link.is_symlink():
            # An entry from before versions: keep it as v1 (readers see no name for the instant in between).
            os.rename(link, self.root / kind / version_ref(name, 1))
        tmp = self.root / kind / f".link-{name}-{uuid.uuid4().hex[:8]}"
        os.symlink(version_ref(name, version), tmp)
        os.replace(tmp, link)

    def _next_version(self, kind: str, name: str) -> int:
        link = self.root / kind / name
        have = [v.version for v in self.versions(kind, name)]
        legacy = 1 if link.is_dir() and not link.is_symlink() else 0
        return max(have + [legacy]) + 1

    def rollback(self, kind: str, name: str, version: int) -> Path:
        """Point `name` back (or forward) to a kept version; serving replicas follow on their next poll."""
        target = self.root / kind / version_ref(validate_name(name), version)
        if not (target / MANIFEST_NAME).is_file():
            kept = ", ".join(f"v{v.version}" for v in self.versions(kind, name)) or "none"
            raise RegistryError(f"{kind}/{name} has no version v{version} (kept: {kept})")
        try:
            Manifest.read(target).verify_files(target)
        except ManifestError as e:
            raise RegistryError(f"refusing to roll back to {kind}/{version_ref(name, version)}: {e}") from e
        self._point(kind, name, version)
        return target

    def prune(self, kind: str, name: str, keep: int) -> list[int]:
        """Delete the oldest versions beyond `keep`, never the one the name serves; returns what went."""
        if keep < 1:
            raise RegistryError(f"keep must be >= 1, got {keep}")
        gone = []
        for v in self.versions(kind, name)[:-keep]:
            if not v.serving:
                self._remove(v.path)
                gone.append(v.version)
        return gone

    def _publish_version(self, kind: str, name: str, fill: Callable[[Path], Manifest], metrics: dict,
                         gate: GatePolicy | None, override_gate: str | None, keep: int) -> Path:
        """Gate, then write `name@vN` (fill writes the files and returns the manifest), point `name` at it, prune."""
        decision: GateResult | None = None
        if gate is not None:
            decision = enforce(metrics, gate, name, override_gate)
        version = self._next_version(kind, name)
        target = self.root / kind / version_ref(name, version)
        try:
            with atomic_dir(target) as tmp:
                m = fill(tmp)
                m.extra = {**m.extra, "version": version, "published_at": m.created_at,
                           "gate": decision.record() if decision else {"checked": False}}
                if decision is not None:
                    _append_gate_to_card(tmp, m, decision)
                if (tmp / "README.md").is_file():
                    m.files["README.md"] = sha256_file(tmp / "README.md")
                m.write(tmp)
        except (FileExistsError, OSError) as e:
            if target.exists():
                raise RegistryError(f"{kind}/{version_ref(name, version)} appeared meanwhile "
                                    f"(another publish of {name!r}); retry") from e
            raise
        self._point(kind, name, version)
        self.prune(kind, name, keep)
        return target

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

    def _check_run(self, run_dir: RunDir) -> Manifest:
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
        return rm

    def _check_base(self, name: str, base: dict) -> None:
        """An adapter needs its base in the registry: register it, or refuse a different one."""
        current = self.base()
        if current is None:
            src_base = Path(base.get("path", ""))
            if not src_base.is_dir():
                raise RegistryError(f"registry has no base model and the run's base {src_base} is not on disk")
            self.register_base(src_base, base["name"], base["sha256"])
            return
        have = Manifest.read(current[1]).base_model.get("sha256")
        if have != base.get("sha256"):
            raise RegistryError(
                f"adapter {name!r} was trained on base sha256 {str(base.get('sha256'))[:12]}, "
                f"but the registry serves {current[0]!r} ({str(have)[:12]})")

    def publish_run(self, run: Path | str, name: str, *, gate: GatePolicy | None = None,
                    override_gate: str | None = None, keep: int = KEEP_VERSIONS) -> Path:
        """Publish a finished run's adapter (or full model) as a new version of `name`, atomically.

        With a gate policy the run's metrics must pass it (GateRefused otherwise, unless `override_gate`
        gives a reason, which is recorded). Registers the base model if needed. Returns the new version's folder.
        """
        run_dir = RunDir(Path(run))
        validate_name(name)
        rm = self._check_run(run_dir)
        kind, src = ("adapters", run_dir.adapter) if run_dir.adapter.is_dir() else ("models", run_dir.model)
        if not src.is_dir():
            raise RegistryError(f"{run_dir.root}: has neither adapter/ nor model/ to publish")
        if kind == "adapters":
            self._check_base(name, rm.base_model)

        def fill(tmp: Path) -> Manifest:
            for p in sorted(src.rglob("*")):
                if p.is_file():
                    _link_or_copy(p, tmp / p.relative_to(src))
            files = _verified_digests(rm.files, f"{src.name}/", tmp)
            if run_dir.model_card.is_file():
                (tmp / "README.md").unlink(missing_ok=True)  # may be a hard link into the run: never write through it
                shutil.copy2(run_dir.model_card, tmp / "README.md")
            files.pop("README.md", None)
            m = Manifest(kind=kind.rstrip("s"), name=name, method=rm.method, base_model=rm.base_model,
                         peft_config=rm.peft_config, dataset=rm.dataset, metrics=rm.metrics,
                         servability=rm.servability, versions=rm.versions,
                         extra={"run": str(run_dir.root.resolve()), "run_created_at": rm.created_at})
            m.files = files
            return m

        return self._publish_version(kind, name, fill, rm.metrics, gate, override_gate, keep)

    def publish_checkpoint(self, run: Path | str, step: int, name: str, keep: int = 1) -> Path:
        """Publish the adapter of a finished run's checkpoint-<step> as `name` (a fine-tuning job's checkpoint).

        Only the adapter's config and safetensors weights go in (never the optimizer's pickles); the manifest
        is the run's, with the checkpoint's step and training loss. Not gated: the run's final adapter passed
        the gate, and a checkpoint is an earlier state of that run, served by name on request."""
        run_dir = RunDir(Path(run))
        validate_name(name)
        rm = self._check_run(run_dir)
        src = run_dir.checkpoints / f"checkpoint-{step}"
        weights = [src / "adapter_config.json", src / "adapter_model.safetensors"]
        if not all(w.is_file() for w in weights) or not (src / "trainer_state.json").is_file():
            raise RegistryError(f"{src}: not a complete adapter checkpoint")
        self._check_base(name, rm.base_model)

        def fill(tmp: Path) -> Manifest:
            for w in weights:
                _link_or_copy(w, tmp / w.name)
            m = Manifest(kind="adapter", name=name, method=rm.method, base_model=rm.base_model,
                         peft_config=rm.peft_config, dataset=rm.dataset, metrics=_checkpoint_metrics(src, step),
                         servability=rm.servability, versions=rm.versions,
                         extra={"run": str(run_dir.root.resolve()), "checkpoint_step": step})
            m.files = file_checksums(tmp)
            return m

        return self._publish_version("adapters", name, fill, {}, None, None, keep)

    def publish_model(self, folder: Path | str, name: str, *, gate: GatePolicy | None = None,
                      override_gate: str | None = None, keep: int = KEEP_VERSIONS) -> Path:
        """Publish an exported model folder (merged, ONNX, int8, TensorRT) as a new version of models/<name>."""
        folder = Path(folder)
        validate_name(name)
        try:
            src = Manifest.read(folder)
            src.verify_files(folder)
        except ManifestError as e:
            raise RegistryError(f"refusing to publish: {e}") from e
        if src.kind != "model":
            raise RegistryError(f"{folder}: manifest kind is {src.kind!r}, expected 'model' (an export)")

        def fill(tmp: Path) -> Manifest:
            for p in sorted(folder.rglob("*")):
                rel = p.relative_to(folder)
                if p.is_file() and rel.name != MANIFEST_NAME and not any(s.startswith(".") for s in rel.parts):
                    _link_or_copy(p, tmp / rel)
            src.name = name
            src.extra = {**src.extra, "published_from": str(folder.resolve())}
            src.files = {k: v for k, v in _verified_digests(src.files, "", tmp).items() if k != "README.md"}
            return src

        return self._publish_version("models", name, fill, src.metrics, gate, override_gate, keep)

    def unpublish(self, kind: str, ref: str) -> None:
        """Remove a name with all its versions, or one pinned `name@vN` that the name does not serve."""
        name, version = split_ref(ref)
        link = self.root / kind / name
        if version is not None:
            if self.serving_version(kind, name) == version:
                raise RegistryError(f"{kind}/{name} serves {ref}; roll back or unpublish {name!r} first")
            target = self.path(kind, ref)
            if not target.is_dir():
                raise RegistryError(f"{kind}/{ref} is not in {self.root}")
            self._remove(target)
            return
        if not link.exists() and not link.is_symlink():
            raise RegistryError(f"{kind}/{name} is not in {self.root}")
        if link.is_symlink():
            link.unlink()  # the name goes first: readers stop serving it, then its versions go
            for v in self.versions(kind, name):
                self._remove(v.path)
        else:
            self._remove(link)

    @staticmethod
    def _remove(p: Path) -> None:
        """Rename out of sight, then delete."""
        trash = p.parent / f".trash-{p.name}-{uuid.uuid4().hex[:8]}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def verify(self, kind: str, ref: str) -> Manifest:
        """Manifest of an entry after checking every file's sha256."""
        p = self.path(kind, ref)
        m = Manifest.read(p)
        m.verify_files(p)
        return m


def _checkpoint_metrics(checkpoint: Path, step: int) -> dict:
    """The step and the last logged training loss at or before it, from the Trainer's state in the checkpoint."""
    history = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("log_history", [])
    return {"step": step, "train_loss": loss_at(history, step)}


def _append_gate_to_card(folder: Path, m: Manifest, decision: GateResult) -> None:
    """The model card of a published version says what the gate measured and decided."""
    card = folder / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else f"# {m.name}\n"
    card.unlink(missing_ok=True)  # may be a hard link into the source: write a new file
    verdict = ("passed" if decision.passed
               else f"REFUSED, published with --override-gate (reason: {decision.override_reason})")
    text += (f"\n## Publish gate (version v{m.extra.get('version')})\n\n{verdict}: {decision.numbers()}.\n")
    card.write_text(text, encoding="utf-8")
