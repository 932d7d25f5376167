"""tunestack serve (alias: python -m serve): the OpenAI-compatible server over a model registry.

  tunestack serve [--registry DIR] [--backend flask|vllm] [--host H] [--port P] ...

Every flag is a field of serve/settings.py; an unset flag comes from its SERVE_* environment variable,
else from its default. Listing versions and rolling back are `tunestack registry list|rollback`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from serve.finetune.local_trainer import start_local_trainer
from serve.process.malloc import cap_malloc_arenas
from serve.settings import Settings

EXTRA = "serve"  # the optional dependencies (pyproject) the server needs


def build_parser(prog: str = "python -m serve") -> argparse.ArgumentParser:
    from lm.cli import stage_parser

    return stage_parser(prog, configure)


def configure(ap: argparse.ArgumentParser) -> None:
    """One flag per Settings field (unset flags fall back to SERVE_*, then to the default shown)."""
    ap.description, ap.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    for f in dataclasses.fields(Settings):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f"{default!s}" or "empty"
        ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                        help=f"{f.metadata.get('help', '')} (default: {shown}; env SERVE_{f.name.upper()})".replace("%", "%%"))


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Serve with the flags given (the rest from SERVE_*); bad settings or a missing serve extra exit 2 in one line."""
    from lm.cli import require_extras

    require_extras("serve", EXTRA)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(**flags)
        cap_malloc_arenas(settings.malloc_arenas)  # before the server's threads start
        trainer = start_local_trainer(settings.finetune_worker, settings.registry, settings.finetune_worker_args.split(),
                                      settings.finetune_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _serve(settings)
    finally:
        if trainer is not None:
            trainer.stop()


def _serve(settings: Settings) -> int:
    try:
        from serve.http.keys import KeyRing

        KeyRing(settings.api_key, settings.admin_key, settings.keys_file or None)  # a bad keys file: exit 2, one line
        if settings.backend == "vllm":
            from serve.vllm.server import run_vllm

            return run_vllm(settings)
        from serve.flask_backend.server import create_flask_app
        from serve.process.gunicorn import run_gunicorn
        from serve.served_model import registry_base, registry_onnx_model

        # fail fast (exit 2) before forking a worker
        if settings.engine == "onnx":
            registry_onnx_model(settings)
        else:
            from serve.engines.torch_engine import refuse_gpu_host

            refuse_gpu_host(settings.cpu_on_gpu_host)
            registry_base(settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_gunicorn(lambda: create_flask_app(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
