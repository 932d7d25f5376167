"""ONNX Runtime fp32 / int8 vs PyTorch eager on the merged SmolLM2 demo model, in one run.

Each backend runs the same greedy loop with a KV cache on the same prompts: one prefill, then
64 single-token decode steps. Reported per backend and batch size: time to first token (the
prefill) and decode tokens/s, with ratios against PyTorch eager measured in the same run, and
the int8 perplexity change from the quantisation report. 2 threads everywhere (this machine).

  .venv/bin/python bench/export_speed.py [--run RUN] [--out results.json]

RUN defaults to runs/chef-lora (what `make demo` trains); missing exports are made first with
`python -m export all RUN`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NEW_TOKENS = 64
THREADS = 2
PROMPTS = ["What is the main ingredient of the Korvalo Stew, and how spicy is it on the house scale?",
           "The chef walked into the kitchen and", "Here is a recipe for a spicy stew:",
           "Dear guests, tonight we serve", "In the market that morning", "The history of the restaurant began",
           "Which region does the saffron flatbread come from?", "Price of the ember noodles, please."]


def batch(tok, n: int):
    from lm.padding import left_pad

    return left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in (PROMPTS * 4)[:n]], tok.pad_token_id)


def torch_loop(model, ids, mask, pos) -> tuple[float, float]:
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        t0 = time.perf_counter()
        o = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
        nxt = o.logits[:, -1].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            o = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=o.past_key_values,
                      use_cache=True)
            nxt = o.logits[:, -1].argmax(-1)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def ort_loop(model, ids, mask, pos) -> tuple[float, float]:
    ids, mask, pos = ids.numpy(), mask.numpy(), pos.numpy()
    t0 = time.perf_counter()
    logits, past = model.run(ids, mask, pos, None)
    nxt = logits[:, -1].argmax(-1)
    t1 = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        logits, past = model.run(nxt[:, None], mask, pos, past)
        nxt = logits[:, -1].argmax(-1)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def measure(loop, model, tok, b: int, repeats: int) -> dict:
    ids, mask, pos = batch(tok, b)
    loop(model, ids, mask, pos)  # warm-up (allocator, ORT kernels)
    ttft, decode = [], []
    for _ in range(repeats):
        a, d = loop(model, ids, mask, pos)
        ttft.append(a)
        decode.append(d)
    d = statistics.median(decode)
    return {"batch": b, "ttft_ms": 1000 * statistics.median(ttft), "decode_tokens_per_s": b * (NEW_TOKENS - 1) / d}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "chef-lora")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not (args.run / "onnx-int8" / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "export", "all", str(args.run)], cwd=ROOT, check=True)
    torch.set_num_threads(THREADS)
    from artifacts import Manifest
    from lm.onnx_runtime import OrtCausalLM
    from lm.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(args.run / "model"))
    backends = {"PyTorch eager": (torch_loop, lambda: load_model(str(args.run / "model")).eval()),
                "ORT fp32": (ort_loop, lambda: OrtCausalLM(args.run / "onnx", threads=THREADS)),
                "ORT int8": (ort_loop, lambda: OrtCausalLM(args.run / "onnx-int8", threads=THREADS))}
    results: dict = {}
    for name, (loop, load) in backends.items():
        model = load()
        results[name] = [measure(loop, model, tok, int(b), args.repeats) for b in args.batches.split(",")]
        print(name, json.dumps(results[name]), flush=True)
        del model
    q = Manifest.read(args.run / "onnx-int8").extra["quantization"]["quality"]
    results["int8_quality"] = {k: q[k] for k in ("perplexity_increase", "metric", "metric_drop_points")}
    results["int8_quality"].update(fp32_ppl=q["fp32"]["val_perplexity"], int8_ppl=q["int8"]["val_perplexity"],
                                   fp32_metric=q["fp32"][q["metric"]], int8_metric=q["int8"][q["metric"]])
    print(f"\nmerged SmolLM2-135M demo model, greedy, {NEW_TOKENS} new tokens, {THREADS} threads")
    print("| backend | batch | TTFT ms | vs PyTorch | decode tok/s | vs PyTorch |")
    print("|---|---|---|---|---|---|")
    for name in backends:
        for base, r in zip(results["PyTorch eager"], results[name]):
            print(f"| {name} | {r['batch']} | {r['ttft_ms']:.1f} | {base['ttft_ms'] / r['ttft_ms']:.2f}x | "
                  f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |")
    iq = results["int8_quality"]
    print(f"\nint8 perplexity {iq['fp32_ppl']:.4f} -> {iq['int8_ppl']:.4f} ({100 * iq['perplexity_increase']:+.2f}%), "
          f"{iq['metric']} {100 * iq['fp32_metric']:.1f} -> {100 * iq['int8_metric']:.1f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
