"""Where a training step's time goes: the fused step (train/fast) per variant, with the profiler's top kernels.

One random-weight model of a real shape, one fixed padding-free batch (8 chat rows, lengths drawn
from 50 to 2,000 tokens), forward + backward + fused AdamW per step. Prints ms/step and tokens/s
per variant, then the PyTorch profiler's top CUDA kernels of the variants named in --profile.
A variant's name says what it runs: lora or full; -nodrop (LoRA dropout 0); -eager (no torch.compile);
-graph (the stack replayed from CUDA graphs, train/fast/graphs.py). --batches N cycles N batches of
different token counts (several graph buckets) instead of one. --check first compares the graphed
step with the eager one (LoRA, no dropout): losses and adapter gradients over two buckets, replayed
in turn (the buckets share one memory pool).

  python bench/train_profile.py --shape qwen2-0.5b --variants lora,lora-nodrop,full --profile lora,full
  python bench/train_profile.py --check --variants lora-eager,lora-eager-graph,lora-graph --profile "" --batches 4
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


def _step(m, variant: str):
    from train.fast.decoder import FusedStep
    from train.fast.plan import model_parts

    return FusedStep(m, model_parts(m, 4096), torch.bfloat16, compile="eager" not in variant, graphs="graph" in variant)


def run(shape: str, variant: str, steps: int, profile: bool, python_profile: bool = False,
        trace: Path | None = None, n_batches: int = 1) -> None:
    m = _model(shape, variant)
    step = _step(m, variant)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, fused=True)
    batches = [_batch(m.config.vocab_size, seed) for seed in range(n_batches)]
    batch = batches[0]
    i = [0]

    def one():
        step(**batches[i[0] % n_batches]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        i[0] += 1

    t0 = time.perf_counter()
    for _ in range(max(5, 2 * n_batches)):
        one()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    windows = []
    for _ in range(2):  # two timed windows: their spread is the noise
        t, tokens = time.perf_counter(), sum(batches[(i[0] + k) % n_batches]["input_ids"].numel() for k in range(steps))
        for _ in range(steps):
            one()
        torch.cuda.synchronize()
        windows.append((time.perf_counter() - t, tokens))
    dt = windows[-1][0] / steps
    graphs = f", {len(step.graphs.graphs)} graphs" if step.graphs else ""
    print(f"{shape} {variant}: {' / '.join(f'{w * 1e3 / steps:.1f}' for w, _ in windows)} ms/step, "
          f"{' / '.join(f'{n / w:,.0f}' for w, n in windows)} tokens/s, warm-up {warm:.1f} s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
          f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved{graphs}", flush=True)
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
    del step, opt, m
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_graphs(shape: str) -> None:
    """The graphed step against the eager one on the same weights (LoRA, no dropout), then dropout's masks."""
    m = _model(shape, "lora-nodrop")
    step = _step(m, "lora-graph")
    graphs, params = step.graphs, [p for p in m.parameters() if p.requires_grad]
    batches = [_batch(m.config.vocab_size, seed) for seed in range(4)]

    def loss_and_grads(b, graphed: bool):
        step.graphs = graphs if graphed else None
        loss = step(**b).loss
        return loss.item(), torch.cat([x.float().flatten() for x in torch.autograd.grad(loss, params)])

    for rnd in range(2):  # the second round replays bucket 0 after bucket 1 was captured in the same pool
        for k, b in enumerate(batches[:2]):
            (l0, g0), (l1, g1), (lg, gg) = (loss_and_grads(b, graphed) for graphed in (False, False, True))
            print(f"check round {rnd} batch {k} ({b['input_ids'].numel()} tokens): loss eager {l0:.6f} / {l1:.6f}, "
                  f"graphed {lg:.6f}; adapter gradients rel. diff eager vs eager {_rel(g1, g0):.2e}, "
                  f"graphed vs eager {_rel(gg, g0):.2e}; {len(graphs.graphs)} graphs, off: {graphs.off}", flush=True)
    start = [p.detach().clone() for p in params]
    for name, graphed in (("eager", False), ("eager again", False), ("graphed", True)):
        with torch.no_grad():
            for p, s0 in zip(params, start):
                p.copy_(s0)
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)  # the bench's LoRA rate, a fresh state each time
        losses = []
        for i in range(12):
            step.graphs = graphs if graphed else None
            loss = step(**batches[i % 4]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            del loss  # as the Trainer does: a live graph keeps the adapters' gradient nodes, and a capture fails (graphs.py)
        print(f"trajectory {name}: " + " ".join(f"{x:.4f}" for x in losses), flush=True)
    del step, m, graphs, params, start
    _dropout_masks(shape)


def _dropout_masks(shape: str) -> None:
    """With dropout, each replay draws new masks (a graph could freeze the random state): the loss of one batch varies."""
    m = _model(shape, "lora")
    for p in m.parameters():
        if p.requires_grad and p.ndim == 2 and p.shape[1] == 16:  # B [out, r] starts at zero: give the adapters an output
            torch.nn.init.normal_(p, std=0.02)
    step = _step(m, "lora-graph")
    graphs, b = step.graphs, _batch(m.config.vocab_size)
    for graphed in (False, True):
        step.graphs = graphs if graphed else None
        losses = [step(**b).loss.item() for _ in range(4)]
        print(f"dropout 0.05, one batch, {'graphed' if graphed else 'eager'}: " + " ".join(f"{x:.5f}" for x in losses),
              flush=True)
    del step, m
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--variants", default="lora,lora-nodrop,full,lora-eager")
    ap.add_argument("--profile", default="lora,full")
    ap.add_argument("--python-profile", default="", help="variants whose host time is broken down by cProfile")
    ap.add_argument("--trace", type=Path, help="a folder for the profiled variants' Chrome traces")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed window (two windows)")
    ap.add_argument("--batches", type=int, default=1, help="cycle this many batches of different token counts")
    ap.add_argument("--check", action="store_true", help="first compare the graphed step with the eager one")
    args = ap.parse_args()
    if args.check:
        check_graphs(args.shape)
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
    for v in args.variants.split(","):
        run(args.shape, v, args.steps, v in args.profile.split(","), v in args.python_profile.split(","), args.trace,
            args.batches)


if __name__ == "__main__":
    main()
