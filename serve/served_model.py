"""The model a registry serves: its base (torch engine, vLLM) or an ONNX export; refused at start with one line."""

from __future__ import annotations

from pathlib import Path

from artifacts import Registry
from serve.settings import Settings


class ConfigurationError(ValueError):
    pass


def registry_base(settings: Settings) -> tuple[Registry, str, str, str]:
    reg = Registry(settings.registry)
    base = reg.base()
    if base is None:
        raise ConfigurationError(f"{settings.registry}: no base model in the registry (publish a run first: "
                                 "tunestack registry publish RUN --registry DIR)")
    name, path = base
    sha = reg.manifest("base", name).base_model.get("sha256", "")
    return reg, name, str(path), sha


def registry_onnx_model(settings: Settings, verify: bool = True) -> tuple[str, Path]:
    """The exported model (registry models/<name> with model.onnx) the onnx engine serves.

    verify re-hashes every file (a corrupt export is refused); `python -m serve` does it once
    before forking, the worker only resolves the name."""
    reg = Registry(settings.registry)
    onnx = [n for n in reg.names("models", versions=False) if (reg.root / "models" / n / "model.onnx").is_file()]
    if settings.model:
        if settings.model not in onnx and not (settings.model in reg.names("models")
                                               and (reg.root / "models" / settings.model / "model.onnx").is_file()):
            raise ConfigurationError(f"SERVE_MODEL: {settings.model!r} is not an ONNX model in {reg.root}/models "
                                     f"(have: {', '.join(onnx) or 'none'})")
        name = settings.model
    elif len(onnx) == 1:
        name = onnx[0]
    else:
        raise ConfigurationError(f"{reg.root}/models holds {len(onnx)} ONNX models ({', '.join(onnx) or 'none'}); "
                                 "set SERVE_MODEL (export with: tunestack export all RUN --registry DIR)")
    if verify:
        reg.verify("models", name)
    return name, reg.root / "models" / name
