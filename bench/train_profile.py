"""Where a training step's time goes: the fused step (train/fast) per variant, with the profiler's top kernels.

One random-weight model of a real shape, one fixed padding-free batch (8 chat rows, lengths drawn
from 50 to 2,000 tokens), forward + backward + fused AdamW per step. Prints ms/step and tokens/s
per variant, then the PyTorch profiler's top CUDA kernels of the variants named in --profile.

  python bench/train_profile.py --shape qwen2-0.5b --variants lora,lora-nodrop,full --profile lora,full
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_speed import SHAPES  # noqa: E402


def _batch(vocab: int, seed: int = 0) -> dict:
    from train.fast.collate import PaddingFreeCollator

    rng = random.Random(seed)
    rows = []
    for _ in range(8):
        n = rng.randint(50, 2000)
        ids = [rng.randrange(vocab) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": [-100] * (n // 5) + ids[n // 5:]})
    b = PaddingFreeCollator()(rows)
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}


def _model(shape: str, variant: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=4096, **spec)
    torch.manual_seed(0)
    lora = variant.startswith("lora")
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if lora else torch.float32)
    if lora:
        m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                         lora_dropout=0.0 if "nodrop" in variant else 0.05))
    m.train()
    return m


def run(shape: str, variant: str, steps: int, profile: bool, python_profile: bool = False,
        trace: Path | None = None) -> None:
    from train.fast.decoder import FusedStep
    from train.fast.plan import model_parts

    m = _model(shape, variant)
    step = FusedStep(m, model_parts(m, 4096), torch.bfloat16, compile="eager" not in variant)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, fused=True)
    batch = _batch(m.config.vocab_size)
    tokens = batch["input_ids"].numel()

    def one():
        step(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        one()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    print(f"{shape} {variant}: {dt * 1e3:.1f} ms/step, {tokens / dt:,.0f} tokens/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                one()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70))
        if trace:
            prof.export_chrome_trace(str(trace / f"{shape}-{variant}.trace.json"))
    if python_profile:  # where the host's time goes, by Python function (the step is host-bound when this is near ms/step)
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(5):
            one()
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--variants", default="lora,lora-nodrop,full,lora-eager")
    ap.add_argument("--profile", default="lora,full")
    ap.add_argument("--python-profile", default="", help="variants whose host time is broken down by cProfile")
    ap.add_argument("--trace", type=Path, help="a folder for the profiled variants' Chrome traces")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
    for v in args.variants.split(","):
        run(args.shape, v, args.steps, v in args.profile.split(","), v in args.python_profile.split(","), args.trace)


if __name__ == "__main__":
    main()
