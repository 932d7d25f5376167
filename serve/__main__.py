"""python -m serve: the OpenAI-compatible server over a model registry.

  python -m serve [--registry DIR] [--backend flask|vllm] [--host H] [--port P]
  python -m serve list [--registry DIR]                 names, the version each serves, every kept version
  python -m serve rollback NAME@vN [--registry DIR]     point NAME back to a kept version (replicas follow)

Settings also come from SERVE_* environment variables (serve/settings.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from serve.local_trainer import start_local_trainer
from serve.settings import Settings


def _evidence_line(m) -> str:
    """Task gain, retention and the gate's verdict of one entry, from its manifest."""
    head, ret, gate = m.metrics.get("headline") or {}, m.metrics.get("retention") or {}, m.extra.get("gate") or {}
    gain = f"gain {head['gain_points']:+.1f} ({head.get('metric')})" if head.get("gain_points") is not None else "gain n/a"
    kept = (f"retention {100 * ret['base']:.1f} -> {100 * ret['tuned']:.1f} %" if ret.get("base") is not None
            else "retention n/a")
    if not gate or gate.get("checked") is False:
        verdict = "gate not checked"
    else:
        verdict = (f"gate {'FORCED' if gate.get('forced') else 'passed'} "
                   f"(min_gain {gate.get('min_gain'):g}, max_retention_drop {gate.get('max_retention_drop'):g})")
    return f"{gain}, {kept}, {verdict}"


def _entry_line(reg, kind: str, ref: str, base_sha: str | None) -> str:
    from artifacts import ManifestError

    try:
        m = reg.verify(kind, ref)
    except ManifestError as e:
        return f"REFUSED: {e}"
    if kind == "adapters" and m.base_model.get("sha256") != base_sha:
        return "REFUSED: trained on another base"
    v = m.servability.get("vllm", {})
    vl = f"vllm ok (max-lora-rank {v.get('max_lora_rank')})" if v.get("ok") else "vllm no: " + "; ".join(v.get("reasons", []))
    return f"{m.method} r={(m.peft_config or {}).get('r')}  {vl}  {_evidence_line(m)}"


def cmd_list(registry: Path) -> int:
    """Base, then each adapter and model: the version its name serves, and every kept version."""
    from artifacts import Registry, RegistryError

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
    for kind in ("adapters", "models"):
        for name in reg.names(kind, versions=False):
            serving = reg.serving_version(kind, name)
            print(f"{kind.rstrip('s')} {name} -> {f'v{serving}' if serving else '(unversioned)'}  "
                  f"{_entry_line(reg, kind, name, base_sha)}")
            for v in reg.versions(kind, name):
                mark = "*" if v.serving else " "
                print(f"  {mark} {name}@v{v.version}  {v.manifest.created_at if v.manifest else 'unreadable'}  "
                      f"{_evidence_line(v.manifest) if v.manifest else ''}")
    return 0


def cmd_rollback(argv: list[str]) -> int:
    """Point a name back (or forward) to a kept version; serving replicas follow within their poll interval."""
    from artifacts import Registry, RegistryError, split_ref

    ap = argparse.ArgumentParser(prog="python -m serve rollback")
    ap.add_argument("ref", help="NAME@vN: the version NAME should serve")
    ap.add_argument("--registry", type=Path, default=Path("registry"))
    ap.add_argument("--kind", choices=("adapters", "models"), default="adapters")
    args = ap.parse_args(argv)
    reg = Registry(args.registry)
    try:
        name, version = split_ref(args.ref)
        if version is None:
            raise RegistryError(f"{args.ref!r}: name the version, e.g. {args.ref}@v1 "
                                f"(kept: {', '.join(f'v{v.version}' for v in reg.versions(args.kind, name)) or 'none'})")
        before = reg.serving_version(args.kind, name)
        reg.rollback(args.kind, name, version)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.kind}/{name}: v{before} -> v{version}; replicas pick it up on their next registry poll")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rollback"]:
        return cmd_rollback(argv[1:])
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
        if settings.backend == "vllm":
            from serve.vllm_backend import run_vllm

            return run_vllm(settings)
        from serve.server import create_flask_app, registry_base, registry_onnx_model, run_gunicorn

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
