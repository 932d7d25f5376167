"""python -m serve: the OpenAI-compatible server over a model registry.

  python -m serve [--registry DIR] [--backend flask|vllm] [--host H] [--port P]
  python -m serve list [--registry DIR]

Settings also come from SERVE_* environment variables (serve/settings.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from serve.settings import Settings


def cmd_list(registry: Path) -> int:
    from artifacts import ManifestError, Registry, RegistryError

    reg = Registry(registry)
    try:
        base = reg.base()
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if base is None:
        print(f"error: {registry}: no base model registered (publish a run first)", file=sys.stderr)
        return 2
    base_sha = reg.manifest("base", base[0]).base_model.get("sha256")
    print(f"base  {base[0]}  sha256 {str(base_sha)[:12]}")
    for name in reg.adapters():
        try:
            m = reg.verify("adapters", name)
        except ManifestError as e:
            print(f"adapter {name}  REFUSED: {e}")
            continue
        if m.base_model.get("sha256") != base_sha:
            print(f"adapter {name}  REFUSED: trained on another base")
            continue
        v = m.servability.get("vllm", {})
        vl = f"vllm ok (max-lora-rank {v.get('max_lora_rank')})" if v.get("ok") else "vllm no: " + "; ".join(v.get("reasons", []))
        print(f"adapter {name}  {m.method} r={(m.peft_config or {}).get('r')}  {vl}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["list"]:
        ap = argparse.ArgumentParser(prog="python -m serve list")
        ap.add_argument("--registry", type=Path, default=Path("registry"))
        return cmd_list(ap.parse_args(argv[1:]).registry)
    ap = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Settings):
        ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, help=f.metadata.get("help"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(**{k: v for k, v in vars(args).items() if v is not None})
        if settings.backend == "vllm":
            from serve.vllm_backend import run_vllm

            return run_vllm(settings)
        from serve.server import create_flask_app, registry_base, registry_onnx_model, run_gunicorn

        # fail fast (exit 2) before forking a worker
        registry_onnx_model(settings) if settings.engine == "onnx" else registry_base(settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_gunicorn(lambda: create_flask_app(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
