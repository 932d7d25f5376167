"""Training speed: the project's trainer (`python -m train`'s recipe) vs a plain transformers + peft loop.

Both arms train the same random-weight model of a real shape on the same rows, batch by batch in
the same order (the baseline takes the batches the recipe's own data loader yields), with the same
hyper-parameters (AdamW, constant learning rate, no warm-up, clip 1.0, LoRA r=16 / alpha 32 /
dropout 0.05 on all linear layers), and print side by side:

  tokens/s   real tokens only (padding is not counted), over timed steps after warm-up, in two
             windows: "a / b" are the two windows, the ratio uses their mean
  memory     peak torch.cuda.max_memory_allocated() over the arm (model, optimiser and steps)
  MFU        useful FLOPs per second / the card's bf16 matmul peak measured in this run
             (an 8192^3 product). Useful FLOPs of a step:
                 k * N * tokens + 6 * layers * heads * head_dim * sum(doc_len^2)
             N = parameters of every matrix product (decoder linears + output head; the embedding
             lookup is no product), k = 6 for full fine-tuning (forward 2N, backward 4N) and 4 for
             LoRA (frozen weights need no weight gradient; the adapters' own FLOPs are < 1 %);
             the second term is causal attention (forward 2*l^2*H*D per document and layer,
             backward twice that), the same for both arms and for padded or packed batches.

Baseline, as a user writes it: AutoModelForCausalLM in fp32 (+ peft get_peft_model for LoRA), sdpa
attention, bf16 autocast, rows right-padded to the longest in the batch, torch.optim.AdamW,
loss.backward(), clip_grad_norm_, step. The project's arm is the recipe (train/recipe.py) with its
defaults for the method: it loads, wraps and trains exactly as `python -m train` does.

Data: chat rows whose token lengths are drawn uniformly from 50 to 2,000 (`var`), or rows of exactly
1,024 tokens (`fixed`, the shape of the issue's first measurement). Loss on assistant tokens.

  python bench/train_speed.py --tokenizer TOK --cases qwen2-0.5b:lora:var,qwen2-0.5b:full:var --out DIR
  python bench/train_speed.py --tiny --out DIR      # CPU, tiny model, fp32: checks that it all runs

A case's optional 4th field sets the project arm apart with a recipe override `section.field=value`,
e.g. `training.cuda_graphs=off` for the A/B of CUDA graphs.
`--dropout 0` takes dropout's random masks out of both arms, so their loss curves must coincide.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # real configs, random weights (the GPU machine cannot download checkpoints)
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=None, tie_word_embeddings=True),
}
LR = {"lora": 2e-4, "full": 1e-5}  # the recipe's documented rates for each method
WORDS = ("menu dish spice price region sauce grill herb broth roast crisp tart sweet sour smoked pickled "
         "fresh garden river coast valley forest highland island plain delta steppe fjord basin").split()


# -- model and data ---------------------------------------------------------------------------------
def build_model(shape: str, tok_dir: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tok_dir)
    spec = dict(SHAPES[shape])
    spec["vocab_size"] = spec["vocab_size"] or len(tok)
    cfg = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **spec)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_data(path: Path, tok_dir: Path, rows: int, lengths: tuple[int, int], seed: int = 0) -> Path:
    """Chat rows with total token lengths drawn uniformly from `lengths`; a fifth is the user turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rng = random.Random(seed)
    per_word = len(tok(" ".join(WORDS * 4))["input_ids"]) / (len(WORDS) * 4)
    with open(path, "w") as f:
        for i in range(rows):
            n = rng.randint(*lengths) - 12  # the chat template's own tokens
            words = [rng.choice(WORDS) for _ in range(max(4, int(n / per_word)))]
            cut = max(2, len(words) // 5)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}: {' '.join(words[:cut])}?"},
                                             {"role": "assistant", "content": " ".join(words[cut:])}]}) + "\n")
    return path


# -- the measurement shared by both arms ------------------------------------------------------------
class Meter:
    """Times windows of steps (synchronising the device only at window edges) and records losses."""

    def __init__(self, warmup: int, window: int, tokens: list[int], windows: int = 2):
        self.warmup, self.window, self.windows, self.tokens = warmup, window, windows, tokens
        self.edges: list[float] = []
        self.marks: list = []  # at each window edge: the CUDA graphs captured so far (project arm), else None
        self.losses: list[float] = []

    def steps(self) -> int:
        return self.warmup + self.windows * self.window

    def step_done(self, step: int, mark=None) -> None:  # step counts from 1
        if step >= self.warmup and (step - self.warmup) % self.window == 0 and step <= self.steps():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.edges.append(time.perf_counter())
            self.marks.append(mark)

    def tokens_per_s(self) -> list[float]:
        out = []
        for w in range(len(self.edges) - 1):
            a = self.warmup + w * self.window
            out.append(sum(self.tokens[a:a + self.window]) / (self.edges[w + 1] - self.edges[w]))
        return out


def _reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _peak_reserved_gib() -> float | None:  # what the device holds: CUDA graphs keep their pool reserved
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


def project_arm(args, project_args: list[str], model_dir: Path, data: Path, method: str, work: Path, steps: int, meter: Meter,
                capture: list | None = None) -> dict:
    """The recipe, as `python -m train` runs it; `capture` receives the batches its data loader yields."""
    from transformers import TrainerCallback

    from train.config import load_config
    from train.recipe import FineTuneRecipe

    overrides = [f"model.name_or_path={model_dir}", f"data.train={data}", f"data.eval={data}",
                 "data.validation_fraction=0.01", f"data.max_length={args.max_length}", f"method.name={method}",
                 f"training.max_steps={steps}", f"training.batch_size={args.batch}", "training.logging_steps=1",
                 "training.lr_scheduler=constant", "training.warmup_ratio=0", f"training.lr={LR[method]}",
                 "training.eval_steps=100000", "training.save_steps=100000", "eval.enabled=false",
                 f"output.dir={work}", "output.overwrite=true",
                 # both arms train the same rows; a shared prefix (a CPU's default) would hand the baseline other rows
                 "training.shared_prefix=off", *project_args]
    overrides.append(f"method.dropout={args.dropout}")
    if args.tiny:
        overrides += ["training.fast_path=on"]
    cfg = load_config(None, overrides)

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            graphs = getattr(_fused_step(kw.get("model")), "graphs", None)
            meter.step_done(state.global_step, None if graphs is None else
                            graphs.off or f"{len(graphs.graphs)} graphs, {graphs.capture_s:.1f} s capturing")
            control.should_save = False  # the timed run writes no checkpoint

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                meter.losses.append(float(logs["loss"]))

    _reset_memory()
    recipe = FineTuneRecipe(cfg)
    recipe.setup()
    if capture is not None:
        capture += _loader_batches(recipe, steps)
    trainer = recipe.train(extra_callbacks=[Timer()])
    step = _fused_step(trainer.model)
    return {"peak_gib": _peak_gib(), "peak_reserved_gib": _peak_reserved_gib(), "fast_path": type(step).__name__,
            "cuda_graphs_at_edges": meter.marks}


def _fused_step(model):
    """The model's forward as install() bound it (accelerate wraps it in an autocast function and keeps the original)."""
    return getattr(model, "_original_forward", getattr(model, "forward", None))


def _loader_batches(recipe, steps: int) -> list[list[dict]]:
    """The rows of the first `steps` batches of the recipe's own training data loader, in order."""
    trainer = recipe._trainer()
    rows = []
    for i, b in enumerate(trainer.get_train_dataloader()):
        if i == steps:
            break
        cu = b["cu_seqlens"].tolist() if "cu_seqlens" in b else None
        if cu is None:
            raise SystemExit("the project's arm did not use the padding-free collator (fast path off?)")
        ids, labels = b["input_ids"][0].tolist(), b["labels"][0].tolist()
        rows.append([{"input_ids": ids[s:e], "labels": labels[s:e]} for s, e in zip(cu, cu[1:])])
    return rows


def baseline_arm(args, model_dir: Path, method: str, batches: list[list[dict]], meter: Meter) -> dict:
    """A plain loop over the same batches, written as a user would."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from lm.padding import Collator

    _reset_memory()
    set_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(dev)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR[method], weight_decay=0.0)
    collate = Collator(0)
    model.train()
    losses = []
    for i, rows in enumerate(batches):
        batch = {k: v.to(dev) for k, v in collate(rows).items()}
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        meter.step_done(i + 1)
    meter.losses = [float(x) for x in losses]
    peak = _peak_gib()
    del model, opt, params
    return {"peak_gib": peak, "peak_reserved_gib": _peak_reserved_gib()}


# -- FLOPs and the card's peak --------------------------------------------------------------------------
def useful_flops(model_dir: Path, method: str, batches: list[list[dict]]) -> list[float]:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads
    per_layer = (c.hidden_size * (c.num_attention_heads * hd + 2 * kv * hd) + c.num_attention_heads * hd * c.hidden_size
                 + 3 * c.hidden_size * c.intermediate_size)
    n = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    k = 6 if method == "full" else 4
    out = []
    for rows in batches:
        lens = [len(r["input_ids"]) for r in rows]
        out.append(k * n * sum(lens) + 6 * c.num_hidden_layers * c.num_attention_heads * hd * sum(x * x for x in lens))
    return out


def matmul_peak() -> float | None:
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3)


# -- one case: both arms ---------------------------------------------------------------------------------
def run_case(args, shape: str, method: str, data_kind: str, work: Path, peak: float | None,
             extra: list[str] = ()) -> dict:
    model_dir = build_model(shape, args.tokenizer, work / f"model-{shape}")
    lengths = (1024, 1024) if data_kind == "fixed" else tuple(args.lengths)
    data = build_data(work / f"data-{data_kind}.jsonl", args.tokenizer, args.rows, lengths)
    steps = args.warmup + 2 * args.window
    batches: list[list[dict]] = []
    tokens: list[int] = []
    res = {"shape": shape, "method": method, "data": data_kind, "project_args": [*args.project_args, *extra]}
    proj_meter = Meter(args.warmup, args.window, tokens)
    # The project's arm first: its data loader fixes the batches, then the baseline replays them.
    res["project"] = project_arm(args, res["project_args"], model_dir, data, method, work / f"run-{shape}-{method}-{data_kind}",
                                 steps, proj_meter, capture=batches)
    tokens += [sum(len(r["input_ids"]) for r in rows) for rows in batches]
    base_meter = Meter(args.warmup, args.window, tokens)
    res["baseline"] = baseline_arm(args, model_dir, method, batches, base_meter)
    flops = useful_flops(model_dir, method, batches)
    for arm, m in (("project", proj_meter), ("baseline", base_meter)):
        tps = m.tokens_per_s()
        res[arm].update(tokens_per_s=tps, losses=m.losses)
        if peak and tps:
            flops_per_token = sum(flops[args.warmup:]) / sum(tokens[args.warmup:])
            res[arm]["mfu"] = [t * flops_per_token / peak for t in tps]
    res["padding_share_baseline"] = 1 - sum(tokens) / sum(max(len(r["input_ids"]) for r in rows) * len(rows)
                                            for rows in batches)
    return res


def _fmt(xs: list[float], f: str) -> str:
    return " / ".join(format(x, f) for x in xs) if xs else "-"


def report(results: list[dict], peak: float | None) -> None:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"\n{dev}; bf16 matmul peak measured {peak / 1e12:.0f} TFLOP/s" if peak else f"\n{dev}")
    print("| case | arm | tokens/s (2 windows) | vs baseline (mean / 2nd window) | peak GiB (reserved) | vs baseline | MFU "
          "| loss first -> last | max |dloss| |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        b, p = r["baseline"], r["project"]
        bt, pt = statistics.mean(b["tokens_per_s"] or [0]), statistics.mean(p["tokens_per_s"] or [0])
        diff = max((abs(x - y) for x, y in zip(b["losses"], p["losses"])), default=float("nan"))
        case = " ".join([r["shape"], r["method"], r["data"], *r["project_args"]])
        last = p["tokens_per_s"][-1] / b["tokens_per_s"][-1] if b["tokens_per_s"] and p["tokens_per_s"] else float("nan")
        for arm, a, ratio in (("baseline", b, "1.00x"), ("project", p, f"{pt / bt if bt else float('nan'):.2f}x / {last:.2f}x")):
            mem, res = a["peak_gib"], a.get("peak_reserved_gib")
            mem_ratio = f"{mem / b['peak_gib']:.2f}x" if mem and b["peak_gib"] else "-"
            print(f"| {case} | {arm} | {_fmt(a['tokens_per_s'], ',.0f')} | {ratio} | "
                  f"{'-' if mem is None else format(mem, '.1f')}{'' if res is None else f' ({res:.1f})'} | {mem_ratio} | "
                  f"{_fmt(a.get('mfu', []), '.1%')} | "
                  f"{a['losses'][0]:.3f} -> {a['losses'][-1]:.3f} | {diff if arm == 'project' else 0:.4f} |")
    for r in results:
        if any(r["project"].get("cuda_graphs_at_edges") or []):
            print(f"{r['shape']} {r['method']}: CUDA graphs at the window edges: {r['project']['cuda_graphs_at_edges']}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        for arm in ("baseline", "project"):
            ax.plot(range(1, len(r[arm]["losses"]) + 1), r[arm]["losses"], label=arm)
        ax.set_title(f"{r['shape']} {r['method']} {r['data']}", fontsize=9)
        ax.set_xlabel("step")
        ax.legend()
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="qwen2-0.5b:lora:var,qwen2-0.5b:full:var,qwen2-1.5b:lora:var,qwen2-1.5b:full:var",
                    help="shape:method:data, comma-separated; data is var (50-2,000 tokens) or fixed (1,024)")
    ap.add_argument("--tokenizer", type=Path, help="an HF tokenizer folder (default: the embedded model's)")
    ap.add_argument("--batch", type=int, default=8, help="rows per step")
    ap.add_argument("--warmup", type=int, default=6, help="untimed steps (compilation, allocator)")
    ap.add_argument("--window", type=int, default=12, help="steps per timed window (two windows)")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--lengths", type=int, nargs=2, default=(50, 2000))
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of both arms (0: the curves must coincide)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke size: tiny model, short rows, few steps, fp32")
    ap.add_argument("--project-args", nargs="*", default=[], help="extra section.field=value for the project's arm")
    ap.add_argument("--work", type=Path, default=Path("/tmp/train_speed"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.tiny:
        args.cases = "tiny:lora:var,tiny:full:var" if args.cases == ap.get_default("cases") else args.cases
        args.warmup, args.window, args.rows, args.lengths, args.max_length = 1, 2, 200, (20, 120), 256
        args.dropout = 0.0
    if args.tokenizer is None:
        from train.base_model import resolve
        args.tokenizer = Path(resolve("embedded:smollm2-135m-instruct").path)
    args.work.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak()
    results = []
    for case in args.cases.split(","):
        shape, method, data_kind, *extra = case.split(":")  # an optional 4th field: section.field=value for this case
        results.append(run_case(args, shape, method, data_kind, args.work, peak, extra))
        print(json.dumps({k: v for k, v in results[-1].items()}), flush=True)
    report(results, peak)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_speed.json").write_text(json.dumps({"peak_flops": peak, "results": results}, indent=2))
        plot(results, args.out / "train_speed_loss.png")


if __name__ == "__main__":
    main()
