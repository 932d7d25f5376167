"""The on-disk artifact contract shared by train, export and serve (see artifacts/README.md)."""

from artifacts.atomic import atomic_dir, atomic_write_text
from artifacts.checksums import sha256_file, tree_sha256
from artifacts.manifest import MANIFEST_NAME, Manifest, ManifestError
from artifacts.registry import Registry, RegistryError, validate_name
from artifacts.run_dir import RunDir

__all__ = [
    "MANIFEST_NAME", "Manifest", "ManifestError", "Registry", "RegistryError", "RunDir",
    "atomic_dir", "atomic_write_text", "sha256_file", "tree_sha256", "validate_name",
]
