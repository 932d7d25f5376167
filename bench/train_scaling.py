"""Training throughput of the recipe: 1 GPU vs N GPUs (DDP for LoRA, FSDP for full fine-tuning).

Runs `python -m train` itself (1 process, then `torchrun --nproc_per_node N`) on a random-weight
model of a real shape and on synthetic chat rows packed to full blocks, and prints tokens/s with
the N-GPU/1-GPU ratio measured in the same run. Each multi-GPU run also evaluates base vs tuned
on rank 0 and writes the manifest, so the whole pipeline is exercised, not just the loop.

  python bench/train_scaling.py --gpus 2 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # real architectures, random weights (the GPU machine cannot download checkpoints)
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}
WORDS = ("menu dish spice price region sauce grill herb broth roast crisp tart sweet sour smoked pickled "
         "fresh garden river coast valley forest highland island plain delta steppe fjord basin").split()


def build_model(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), max_position_embeddings=4096,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **spec)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_data(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}: {q}?"},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def run(nproc: int, model: Path, data: Path, out: Path, method: str, steps: int, batch: int,
        extra: list[str]) -> dict:
    launcher = [sys.executable, "-m", "train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train"]
    args = [f"model.name_or_path={model}", f"data.train={data}", f"data.eval={data}", "data.packing=true",
            "data.max_length=1024", "data.validation_fraction=0.01", f"method.name={method}",
            f"training.max_steps={steps}", f"training.batch_size={batch}", "training.logging_steps=5",
            f"training.eval_steps={steps}", f"training.save_steps={steps}", "training.lr=1e-4",
            "eval.max_examples=16", "eval.max_new_tokens=8", f"output.dir={out}", *extra]
    t0 = time.time()
    p = subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"run failed ({nproc} procs, {method}):\n{p.stderr[-4000:]}")
    logs = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in logs if "train_runtime" in r)
    rep = json.loads((out / "data_report.json").read_text())
    tokens_per_block = rep["tokens"]["train"]["tokens"] / rep["packed_rows"]
    # Steady state: from the first logged step after warm-up (CUDA init, allocator, NCCL setup) to the last.
    timed = [r for r in logs if "loss" in r and r["step"] >= min(10, steps // 4)]
    span_steps = timed[-1]["step"] - timed[0]["step"]
    span_s = timed[-1]["time"] - timed[0]["time"]
    tokens_per_s = span_steps * batch * nproc * tokens_per_block / span_s
    losses = [r["loss"] for r in logs if "loss" in r]
    man = json.loads((out / "manifest.json").read_text())
    return {"gpus": nproc, "method": method, "tokens_per_s": tokens_per_s, "steady_steps": span_steps,
            "train_runtime_s": summary["train_runtime"], "wall_s": wall, "first_loss": losses[0],
            "last_loss": losses[-1], "manifest_files": len(man["files"]),
            "eval_rows": (man["metrics"].get("headline") or {}).get("eval_rows")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", type=Path, required=True, help="an HF tokenizer folder")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8, help="per GPU, blocks of 1024 tokens")
    ap.add_argument("--work", type=Path, default=Path("/tmp/train_scaling"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"needs {args.gpus} GPUs, found {torch.cuda.device_count()}")
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.shape, args.tokenizer, args.work / "model")
    data = build_data(args.work / "data.jsonl", rows=12000)
    results = []
    plan = [("lora", 1, []), ("lora", 1, []), ("lora", args.gpus, []), ("full", 1, []),
            ("full", args.gpus, ["training.fsdp=full_shard auto_wrap"])]  # first run warms caches; the 2nd is the baseline
    for i, (method, n, extra) in enumerate(plan):
        r = run(n, model, data, args.work / f"{i}-{method}-{n}", method, args.steps, args.batch, extra)
        results.append(r)
        print(json.dumps(r), flush=True)
    results.pop(0)
    print(f"\n{args.shape}, {torch.cuda.get_device_name(0)}, batch {args.batch} x 1024 tokens per GPU, {args.steps} steps")
    print("tokens/s: steady state (steps 10..end); the first 1-GPU run only warms caches and is dropped")
    print("| method | GPUs | tokens/s | vs 1 GPU | loss first -> last |")
    print("|---|---|---|---|---|")
    for r in results:
        one = next(x for x in results if x["method"] == r["method"] and x["gpus"] == 1)
        print(f"| {r['method']}{' (FSDP)' if r['method'] == 'full' and r['gpus'] > 1 else ' (DDP)' if r['gpus'] > 1 else ''} "
              f"| {r['gpus']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / one['tokens_per_s']:.2f}x "
              f"| {r['first_loss']:.2f} -> {r['last_loss']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
