"""The shared-prefix batches of the fused step on a CPU: the demo's LoRA steps with training.shared_prefix on vs off.

Each run is `tunestack train smollm2_lora_chef` for --steps steps (evaluation cut to 4 rows, no retention,
no checkpoints), arms alternating off/on --runs times in one process tree, each at --threads threads.
Prints the Trainer's train_runtime per run, the mean ± sd per arm, the ratio of means, and the two
arms' train_loss (equal up to LoRA dropout's draws); writes it all to --out as JSON.

  python bench/shared_prefix.py --steps 16 --runs 3 --threads 1 --out bench/results/shared_prefix
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(setting: str, steps: int, threads: int, work: Path) -> dict:
    out = work / f"run-{setting}"
    args = [sys.executable, "-m", "train", "smollm2_lora_chef", f"output.dir={out}", "output.registry=null",
            "output.overwrite=true", f"training.max_steps={steps}", "eval.retention=false", "eval.compare_base=false",
            "eval.max_examples=4", "training.eval_steps=100000", "training.save_steps=100000",
            f"training.shared_prefix={setting}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    log = (p.stdout + p.stderr).replace("\r", "\n")
    if p.returncode != 0:
        raise SystemExit(f"{setting}: train exited {p.returncode}:\n{log[-2000:]}")
    runtime = float(re.search(r"'train_runtime': '([\d.]+)'", log).group(1))
    loss = float(re.search(r"'train_loss': '([\d.]+)'", log).group(1))
    return {"setting": setting, "train_runtime_s": runtime, "train_loss": loss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16, help="training steps per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per arm, alternating")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    a = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            for setting in ("off", "on"):
                r = one_run(setting, a.steps, a.threads, Path(tmp))
                runs.append(r)
                print(f"run {i + 1} {setting:>3}: {r['train_runtime_s']:.1f} s, train_loss {r['train_loss']:.3f}", flush=True)
    arms = {s: [r["train_runtime_s"] for r in runs if r["setting"] == s] for s in ("off", "on")}
    summary = {s: {"mean_s": statistics.mean(v), "sd_s": statistics.stdev(v) if len(v) > 1 else 0.0} for s, v in arms.items()}
    ratio = summary["off"]["mean_s"] / summary["on"]["mean_s"]
    for s, m in summary.items():
        print(f"shared_prefix={s}: {m['mean_s']:.1f} ± {m['sd_s']:.1f} s for {a.steps} steps")
    print(f"speed-up (mean off / mean on): {ratio:.2f}x")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        res = {"steps": a.steps, "threads": a.threads, "runs": runs, "summary": summary, "ratio": ratio,
               "cpu": platform.processor() or platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        path = a.out / f"cpu-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json"
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
