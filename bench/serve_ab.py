"""Serving throughput of this tree against another commit, in one run (A/B/A/B on the same registry).

For refactors that must not cost speed: the Flask backend of git REV (checked out in a temporary
worktree) and of this working tree serve the same registry (SmolLM2-135M fp32, two r=16 LoRA
adapters + base, built once by this tree), alternately, `--rounds` times each, at `--levels`
concurrent streamed requests of 64 tokens (ignore_eos). Prints tokens/s per round and the ratio
this/REV of the medians; the spread between rounds of one tree is the noise to judge it by.

  .venv/bin/python bench/serve_ab.py --ref c5c5dec [--levels 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import build_registry, free_port, load_test, stop, wait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["SmolLM2-135M-Instruct", "lora-a", "lora-b"]


def start_server(tree: Path, reg: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m serve` of the code in `tree` (its own PYTHONPATH), on a free port."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree), "SERVE_THREADS": "2", "SERVE_MAX_MODEL_LEN": "512"}
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--registry", str(reg), "--port", str(port)], cwd=tree,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def measure(tree: Path, reg: Path, levels: list[int], log: Path) -> dict[int, float]:
    proc, url = start_server(tree, reg, log)
    try:
        wait(f"{url}/ready", proc)
        load_test(url, MODELS, 3)  # warm-up
        return {c: load_test(url, MODELS, c)["tokens_per_s"] for c in levels}
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="the commit to compare against (e.g. the one before a refactor)")
    ap.add_argument("--levels", default="32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve-ab-"))
    ref_tree = work / "ref"
    subprocess.run(["git", "worktree", "add", "--detach", str(ref_tree), args.ref], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        reg = build_registry(work)
        runs: dict[str, list[dict[int, float]]] = {"ref": [], "this": []}
        for r in range(args.rounds):
            for name, tree in (("ref", ref_tree), ("this", ROOT)):
                runs[name].append(measure(tree, reg, levels, work / f"{name}-{r}.log"))
                print(f"round {r + 1} {name}: {json.dumps(runs[name][-1])}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT, capture_output=True)
    print(f"\n| concurrent | {args.ref} tokens/s (rounds) | this tree tokens/s (rounds) | this / {args.ref} (medians) |")
    print("|---|---|---|---|")
    for c in levels:
        ref, this = [x[c] for x in runs["ref"]], [x[c] for x in runs["this"]]
        print(f"| {c} | {' / '.join(f'{v:.1f}' for v in ref)} | {' / '.join(f'{v:.1f}' for v in this)} "
              f"| {statistics.median(this) / statistics.median(ref):.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"ref": args.ref, "levels": levels, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
