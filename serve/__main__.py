"""python -m serve list --registry DIR: what a server over this registry would load, and why not."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="list the registry's base model and adapters with their checks")
    ls.add_argument("--registry", type=Path, default=Path("registry"))
    args = ap.parse_args(argv)

    from artifacts import ManifestError, Registry, RegistryError

    reg = Registry(args.registry)
    try:
        base = reg.base()
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if base is None:
        print(f"error: {args.registry}: no base model registered (publish a run first)", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
