"""The demo recipe with replay and without, in one run: task score, retention, KL and the publish gate.

Trains smollm2_lora_chef twice on the embedded SmolLM2, once as it is (data.replay 0.15)
and once with data.replay=0, both for the same number of optimizer steps (the replay arm's), then
asks the gate of each run what `tunestack registry publish` would do. Prints one table and the ratios; writes
results.json. A finished arm (its manifest.json present) is reused, so an interrupted bench resumes.

  .venv/bin/python bench/retention_replay.py [--out bench/results/retention] [--work /tmp/retention-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from artifacts import GatePolicy, Manifest
from artifacts.gate import check

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "smollm2_lora_chef"


def train(out: Path, *overrides: str) -> dict:
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "train", CONFIG, f"output.dir={out}", "output.registry=null",
               "output.overwrite=true", *overrides]
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads((out / "eval.json").read_text())


def row(name: str, ev: dict, run: Path) -> dict:
    r, h = ev["retention"], ev["headline"]
    gate = check(Manifest.read(run).metrics, GatePolicy())
    return {"arm": name, "steps": ev["train_steps"], "train_seconds": ev["train_seconds"],
            "menu_base": 100 * h["base"], "menu_tuned": 100 * h["tuned"],
            "retention_base": 100 * r["base"], "retention_tuned": 100 * r["tuned"], "retention_drop": r["drop_points"],
            "kl": r["kl"], "conditions": {c: {k: 100 * v[k] for k in ("base", "tuned")} for c, v in r["conditions"].items()},
            "by_category": {c: {k: 100 * v[k] for k in ("base", "tuned")} for c, v in r["by_category"].items()},
            "gate": "passes" if gate.passed else "refused: " + "; ".join(gate.reasons)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/retention-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/retention")
    args = ap.parse_args()
    with_replay = train(args.work / "replay")
    steps = with_replay["train_steps"]
    without = train(args.work / "no-replay", "data.replay=0", "training.group_by_length=false",
                    f"training.max_steps={steps}")
    rows = [row("replay 0.15", with_replay, args.work / "replay"), row("no replay", without, args.work / "no-replay")]
    print(f"{'arm':<11} {'steps':>5} {'menu base->tuned':>17} {'retention base->tuned':>22} {'drop':>6} {'KL':>6}  gate")
    for r in rows:
        print(f"{r['arm']:<11} {r['steps']:>5} {r['menu_base']:>7.1f} -> {r['menu_tuned']:>5.1f} "
              f"{r['retention_base']:>11.1f} -> {r['retention_tuned']:>5.1f} {r['retention_drop']:>6.1f} "
              f"{r['kl']:>6.3f}  {r['gate']}")
    a, b = rows
    print(f"replay vs no replay: menu {a['menu_tuned'] - b['menu_tuned']:+.1f} points, retention "
          f"{a['retention_tuned'] - b['retention_tuned']:+.1f} points, KL x{a['kl'] / b['kl']:.2f}, "
          f"training time x{a['train_seconds'] / b['train_seconds']:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
