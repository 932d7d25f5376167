"""Training throughput of the recipe: 1 GPU vs N GPUs under torchrun (DDP for LoRA; DDP or FSDP for full).

Runs `python -m train` itself (1 process, then `torchrun --nproc_per_node N`) on a random-weight
model of a real shape (bench/train_speed.py's shapes and chat data) and prints steady-state tokens/s
with the N-GPU/1-GPU ratio measured in the same run. Every run saves its weights and manifest
through the recipe; evaluation is off (its scorers are not installed on the lent GPU machines).

Rows are ~1,024 tokens each (`--lengths 1024 1024`, the default), so a step's token count is known
from the data report without a per-step all-gather that would itself slow the step:
    tokens/s = steps in the steady span x rows per GPU x GPUs x mean tokens per row / span seconds
The steady span runs from step `max(10, steps/4)` to the last step (CUDA init, compilation and NCCL
set-up fall before it).

  python bench/train_scaling.py --gpus 2 --shape qwen2-1.5b --tokenizer TOK \
      --runs lora:1,lora:1,lora:2,full:1,full:2,full:2:fsdp --out results.json

A run is method:gpus[:fsdp][:section.field=value...]; the first run of each method only warms the compile caches when it is
repeated (the table drops a run whose method/GPUs/mode repeats an earlier one, keeping the later).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_speed import LR, SHAPES, build_data, build_model  # noqa: E402


def run(nproc: int, model: Path, data: Path, out: Path, method: str, args, fsdp: bool, extra: list[str]) -> dict:
    launcher = [sys.executable, "-m", "train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train"]
    steps = args.steps
    cli = [f"model.name_or_path={model}", f"data.train={data}", f"data.eval={data}", "data.validation_fraction=0.01",
           f"data.max_length={args.max_length}", f"method.name={method}", f"training.max_steps={steps}",
           f"training.batch_size={args.batch}", "training.logging_steps=5", f"training.eval_steps={steps}",
           "training.save_steps=100000", f"training.lr={LR[method]}", "eval.enabled=false", f"output.dir={out}", "output.overwrite=true", *(["training.fsdp=full_shard auto_wrap"] if fsdp else []),
           *args.project_args, *extra]
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([*launcher, *cli], cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"run failed ({nproc} procs, {method}):\n{p.stderr[-4000:]}")
    logs = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    rep = json.loads((out / "data_report.json").read_text())["tokens"]["train"]
    timed = [r for r in logs if "loss" in r and r["step"] >= max(10, steps // 4)]
    span_steps, span_s = timed[-1]["step"] - timed[0]["step"], timed[-1]["time"] - timed[0]["time"]
    losses = [r["loss"] for r in logs if "loss" in r]
    man = json.loads((out / "manifest.json").read_text())  # the run's output was written and recorded
    fast = [line for line in p.stdout.splitlines() + p.stderr.splitlines() if "fast path" in line or "fused step" in line]
    mode = "fsdp" if fsdp else "ddp" if nproc > 1 else "-"
    return {"gpus": nproc, "method": method, "mode": " ".join([mode, *extra]),
            "tokens_per_s": span_steps * args.batch * nproc * rep["tokens"] / rep["rows"] / span_s,
            "steady_steps": span_steps, "wall_s": wall, "first_loss": losses[0], "last_loss": losses[-1],
            "manifest_files": len(man["files"]), "fast_path_lines": fast[:2]}


def table(results: list[dict], title: str) -> None:
    print(f"\n{title}")
    print("| method | GPUs | mode | tokens/s | vs 1 GPU | loss first -> last |")
    print("|---|---|---|---|---|---|")
    for r in results:
        one = next((x for x in results if x["method"] == r["method"] and x["gpus"] == 1), None)
        ratio = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one else "-"
        print(f"| {r['method']} | {r['gpus']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {ratio} "
              f"| {r['first_loss']:.2f} -> {r['last_loss']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--shape", default="qwen2-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", type=Path, required=True, help="an HF tokenizer folder")
    ap.add_argument("--runs", default="lora:1,lora:1,lora:2,full:1,full:2", help="method:gpus[:fsdp][:section.field=value...], comma-separated")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="rows per GPU")
    ap.add_argument("--lengths", type=int, nargs=2, default=(1024, 1024))
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--project-args", nargs="*", default=[], help="extra section.field=value for every run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/train_scaling"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"needs {args.gpus} GPUs, found {torch.cuda.device_count()}")
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.shape, args.tokenizer, args.work / "model")
    data = build_data(args.work / "data.jsonl", args.tokenizer, rows=2000, lengths=tuple(args.lengths))
    results = []
    for i, spec in enumerate(args.runs.split(",")):
        method, n, *more = spec.split(":")
        r = run(int(n), model, data, args.work / f"{i}-{method}-{n}", method, args, "fsdp" in more,
                [x for x in more if x != "fsdp"])
        results = [x for x in results if (x["method"], x["gpus"], x["mode"]) != (r["method"], r["gpus"], r["mode"])]
        results.append(r)
        print(json.dumps(r), flush=True)
    table(results, f"{args.shape}, {torch.cuda.get_device_name(0)}, {args.batch} rows of ~{args.lengths[0]} tokens "
                   f"per GPU, {args.steps} steps; steady-state tokens/s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
