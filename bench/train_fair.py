"""Training speed against a FAIR plain loop (issue 29, item 1): the recipe vs transformers + peft done right.

`bench/train_speed.py`'s baseline is the loop a user writes first (fp32 weights, the default
allocator, unfused AdamW); it was allocator-bound (74-77 GiB reserved, windows 30-60 % apart), which
inflated every ratio. This bench keeps the project arm (the recipe, exactly as `python -m train` runs
it: `train_speed.project_arm`) and gives the baseline what a careful user would:

  weights     the recipe's dtype on this device: bf16 frozen base for LoRA, fp32 master weights for
              full fine-tuning (both under bf16 autocast) on a bf16 GPU; fp32 on a CPU
  optimiser   torch.optim.AdamW(fused=True) on CUDA (the Trainer's default there is adamw_torch_fused),
              weight decay 0, clip 1.0 (the recipe's defaults); LoRA r=16 / alpha 32 / all linear layers
  allocator   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for the whole process, so for both arms
              (`--allocator default` leaves it unset, again for both)
  attention   sdpa (the recipe's default)
  data        the same batches in the same order (the recipe's data loader yields them, the baseline
              replays them), so the same tokens per step; right-padded to the longest row (none on
              fixed-length data)

Data kinds: `BxL` = B rows of exactly L tokens a step (rows are generated longer and cut at
data.max_length = L), e.g. 8x1024 and 4x2048; `var` = 8 rows of 50-2,000 tokens (train_speed's).
Timing: `--warmup` untimed steps (compilation, CUDA-graph capture, allocator), then `--windows` (>= 5)
windows of `--window` steps each, the device synchronised only at window edges. Printed per arm: the
median tokens/s over windows with [min-max], peak allocated (reserved) memory, MFU at the median.

MFU = useful FLOPs per second / the card's bf16 matmul peak measured in this run (8192^3 product);
useful FLOPs of a step = k * N * tokens + 6 * layers * heads * head_dim * sum(doc_len^2), N = the
parameters of every matrix product (decoder linears + output head), k = 6 for full fine-tuning and 4
for LoRA (frozen weights get no weight gradient; the adapters' FLOPs are < 1 %); real tokens only,
the same count for both arms (train_speed.useful_flops). `mfu_spec` divides by the data-sheet dense
bf16 peak instead (989 TFLOP/s for H100 SXM and H200).

  python bench/train_fair.py --cases qwen2-0.5b:lora:8x1024,qwen2-0.5b:full:8x1024 --out DIR
  python bench/train_fair.py --tiny --out DIR      # CPU, tiny model, fp32: checks that it all runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import train_speed as ts  # noqa: E402  (bench/ is on sys.path when run as a script)

SPEC_PEAK = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16, SXM data sheets


def fair_baseline(args, model_dir: Path, method: str, batches: list[list[dict]], meter: "ts.Meter") -> dict:
    """The plain transformers + peft loop with the recipe's precision, fused AdamW, sdpa."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from lm.padding import Collator

    ts._reset_memory()
    set_seed(0)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 and method == "lora" else torch.float32  # as train/recipe.py setup()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(dev)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ts.LR[method], weight_decay=0.0, fused=cuda)
    collate = Collator(0)
    model.train()
    losses = []
    for i, rows in enumerate(batches):
        batch = {k: v.to(dev, non_blocking=True) for k, v in collate(rows).items()}
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        meter.step_done(i + 1)
    meter.losses = [float(x) for x in losses]
    out = {"peak_gib": ts._peak_gib(), "peak_reserved_gib": ts._peak_reserved_gib(), "weights": str(dtype),
           "optimizer": f"torch.optim.AdamW(fused={cuda})"}
    del model, opt, params
    ts._reset_memory()
    return out


def data_spec(kind: str, tiny: bool) -> tuple[int, tuple[int, int], int]:
    """(rows a step, generated length range, data.max_length) of a data kind."""
    if kind == "var":
        return (4, (20, 120), 256) if tiny else (8, (50, 2000), 2048)
    b, n = (int(x) for x in kind.split("x"))
    return b, (n + 32, n + 96), n  # every row is cut at max_length: exactly n tokens


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else {}


def run_case(args, shape: str, method: str, kind: str, peak: float | None, extra: list[str]) -> dict:
    batch, lengths, max_len = data_spec(kind, args.tiny)
    cargs = argparse.Namespace(**{**vars(args), "batch": batch, "max_length": max_len})
    model_dir = ts.build_model(shape, args.tokenizer, args.work / f"model-{shape}")
    data = ts.build_data(args.work / f"data-{kind}.jsonl", args.tokenizer, args.rows, lengths)
    tokens: list[int] = []
    batches: list[list[dict]] = []
    res = {"shape": shape, "method": method, "data": kind, "project_args": [*args.project_args, *extra]}
    pm = ts.Meter(args.warmup, args.window, tokens, args.windows)
    t0 = time.perf_counter()
    res["project"] = ts.project_arm(cargs, res["project_args"], model_dir, data, method,
                                    args.work / f"run-{shape}-{method}-{kind}", pm.steps(), pm, capture=batches)
    res["project"]["wall_s"] = time.perf_counter() - t0
    ts._reset_memory()
    tokens += [sum(len(r["input_ids"]) for r in rows) for rows in batches]
    bm = ts.Meter(args.warmup, args.window, tokens, args.windows)
    t0 = time.perf_counter()
    res["baseline"] = fair_baseline(cargs, model_dir, method, batches, bm)
    res["baseline"]["wall_s"] = time.perf_counter() - t0
    flops = ts.useful_flops(model_dir, method, batches)
    per_token = sum(flops[args.warmup:]) / max(1, sum(tokens[args.warmup:]))
    spec = next((v for k, v in SPEC_PEAK.items() if torch.cuda.is_available() and k in torch.cuda.get_device_name(0)), None)
    for arm, m in (("project", pm), ("baseline", bm)):
        tps = m.tokens_per_s()
        res[arm].update(tokens_per_s=tps, tps=summary(tps), losses=m.losses, windows_marks=m.marks)
        if peak and tps:
            res[arm]["mfu"] = statistics.median(tps) * per_token / peak
        if spec and tps:
            res[arm]["mfu_spec"] = statistics.median(tps) * per_token / spec
    res["tokens_per_step"] = summary(tokens)
    res["padding_share_baseline"] = 1 - sum(tokens) / sum(max(len(r["input_ids"]) for r in rows) * len(rows)
                                            for rows in batches)
    return res


def _tps(s: dict) -> str:
    return f"{s['median']:,.0f} [{s['min']:,.0f}-{s['max']:,.0f}]" if s else "-"


def _mem(a: dict) -> str:
    return "-" if a.get("peak_gib") is None else f"{a['peak_gib']:.1f} ({a['peak_reserved_gib']:.1f})"


def report(results: list[dict], peak: float | None) -> None:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"\n{dev}; bf16 matmul peak measured {peak / 1e12:.0f} TFLOP/s" if peak else f"\n{dev}")
    print("| case | baseline tokens/s median [min-max] | project tokens/s median [min-max] | ratio [worst-best] "
          "| peak GiB alloc (reserved) baseline -> project | mem ratio | MFU baseline / project | max |dloss| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        b, p = r["baseline"], r["project"]
        bs, ps = b["tps"], p["tps"]
        ratio = (f"{ps['median'] / bs['median']:.2f}x [{ps['min'] / bs['max']:.2f}-{ps['max'] / bs['min']:.2f}]"
                 if bs and ps else "-")
        mem = f"{p['peak_gib'] / b['peak_gib']:.2f}x" if p.get("peak_gib") and b.get("peak_gib") else "-"
        mfu = " / ".join(f"{a['mfu']:.1%}" if "mfu" in a else "-" for a in (b, p))
        diff = max((abs(x - y) for x, y in zip(b["losses"], p["losses"])), default=float("nan"))
        case = " ".join([r["shape"], r["method"], r["data"], *r["project_args"]])
        print(f"| {case} | {_tps(bs)} | {_tps(ps)} | {ratio} | {_mem(b)} -> {_mem(p)} | {mem} | {mfu} | {diff:.4f} |")
    own = {(r["shape"], r["data"], r["method"]): r["project"]["tps"] for r in results if not r["project_args"]}
    for (shape, kind, method), s in own.items():
        full = own.get((shape, kind, "full"))
        if method == "lora" and full and s:
            print(f"{shape} {kind}: project LoRA / project full = {s['median'] / full['median']:.2f}x "
                  f"[{s['min'] / full['max']:.2f}-{s['max'] / full['min']:.2f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="qwen2-0.5b:lora:8x1024,qwen2-0.5b:full:8x1024,qwen2-0.5b:lora:var",
                    help="shape:method:data[:section.field=value], comma-separated; data is BxL (e.g. 8x1024, 4x2048) or var")
    ap.add_argument("--tokenizer", type=Path, help="an HF tokenizer folder (default: the embedded model's)")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps (compilation, graph capture, allocator)")
    ap.add_argument("--window", type=int, default=6, help="steps per timed window")
    ap.add_argument("--windows", type=int, default=5, help="timed windows (>= 5 for a median with its spread)")
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of both arms (0: the curves must coincide)")
    ap.add_argument("--allocator", choices=("expandable", "default"), default="expandable",
                    help="expandable: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for both arms")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke size: tiny model, short rows, few steps, fp32")
    ap.add_argument("--project-args", nargs="*", default=[], help="extra section.field=value for the project's arm")
    ap.add_argument("--work", type=Path, default=Path("/tmp/train_fair"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.allocator == "expandable":  # read when CUDA first allocates: before matmul_peak()
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if args.tiny:
        args.cases = "tiny:lora:4x96,tiny:full:4x96,tiny:lora:var" if args.cases == ap.get_default("cases") else args.cases
        args.warmup, args.window, args.windows, args.rows, args.dropout = 1, 1, 5, 60, 0.0
    if args.tokenizer is None:
        from train.base_model import resolve
        args.tokenizer = Path(resolve("embedded:smollm2-135m-instruct").path)
    args.work.mkdir(parents=True, exist_ok=True)
    peak = ts.matmul_peak()
    meta = {"peak_flops": peak, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
            "torch": torch.__version__, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "warmup": args.warmup, "window": args.window, "windows": args.windows}
    results = []
    for case in args.cases.split(","):
        shape, method, kind, *extra = case.split(":")
        results.append(run_case(args, shape, method, kind, peak, extra))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("project", "baseline")} |
                         {a: results[-1][a]["tps"] for a in ("baseline", "project")}), flush=True)
        if args.out:  # after every case: a call cut short keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "train_fair.json").write_text(json.dumps({**meta, "results": results}, indent=2))
    report(results, peak)


if __name__ == "__main__":
    main()
