"""The on-disk artifact contract shared by train, export and serve (see artifacts/README.md)."""

from artifacts.atomic import atomic_dir, atomic_write_text
from artifacts.checksums import sha256_file, tree_sha256
from artifacts.manifest import MANIFEST_NAME, Manifest, ManifestError
from artifacts.gate import GatePolicy, GateRefused, GateResult
from artifacts.registry import Registry, RegistryError, split_ref, validate_name, version_ref
from artifacts.run_dir import RunDir

__all__ = [
    "MANIFEST_NAME", "Manifest", "ManifestError", "Registry", "RegistryError", "RunDir",
    "GatePolicy", "GateRefused", "GateResult", "atomic_dir", "atomic_write_text", "sha256_file", "split_ref",
    "tree_sha256", "validate_name", "version_ref",
]
