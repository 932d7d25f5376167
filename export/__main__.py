"""python -m export merge RUN [--out DIR] [--force]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export", description="Export a run's weights.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge a run's adapter into its base (verified logits)")
    m.add_argument("run", type=Path)
    m.add_argument("--out", type=Path, help="default: RUN/model")
    m.add_argument("--base", help="base model folder; default: the one in the run's manifest")
    m.add_argument("--force", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)

    from artifacts import Manifest, ManifestError
    from export.merge import MergeError, merge_run_adapter

    try:
        man = Manifest.read(args.run)
        man.verify_files(args.run)
        if not (args.run / "adapter").is_dir():
            raise MergeError(f"{args.run}: has no adapter/ to merge (method {man.method})")
        out = args.out or args.run / "model"
        if out.exists() and not args.force:
            raise MergeError(f"{out}: exists; pass --force to replace it")
        res = merge_run_adapter(args.run, args.base or man.base_model["path"], out, replace=args.force)
    except (ManifestError, MergeError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged into {res['path']} (max |logit diff| {res['max_abs_logit_diff']:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
