"""Peak GPU memory and loss curves of QLoRA vs LoRA on the Qwen2-7B shape (random weights).

Both arms run one after the other in the same process, on the same random base weights (every
tensor is filled from its own seed, derived from --seed and its name), on the same fixed batch of
random token ids (batch 1 x --seq tokens), for --steps AdamW steps, with bf16 autocast (what the
recipe's Trainer does with bf16=True), gradient checkpointing and grad-norm clipping at 1.0:

  lora   the bf16 base, frozen, on the GPU + peft LoRA (r=16, alpha=32, all-linear).
  qlora  what the `qlora` method does: the same base quantised to 4-bit NF4 with bitsandbytes
         (BitsAndBytesConfig(load_in_4bit, nf4, compute bf16, double quant)), frozen in its compute
         dtype, and the same LoRA config.
  qlora_fp32_upcast  (diagnostic, opt-in) like qlora but through peft.prepare_model_for_kbit_training,
         which upcasts every non-4-bit weight (embeddings, lm_head, norms) to fp32: +4 GiB on this
         shape, the reason the method skips it.

The 4-bit model is built in memory, never saved: the bf16 weights are made on the GPU one decoder
layer at a time and each linear is quantised (bnb Linear4bit, skipping lm_head as transformers does)
before the next layer exists, so, as with from_pretrained(quantization_config=...), the full bf16
model is never resident during a QLoRA arm.

Memory: torch.cuda.reset_peak_memory_stats() at the start of each arm (after freeing the last one);
`setup` is what the model + adapter hold before training, `peak` is max_memory_allocated() over the
whole arm (build included), `peak_reserved` the allocator's max_memory_reserved(). Prints a table and
qlora_peak / lora_peak, and writes results.json and loss_curves.png into --out.

  python bench/qlora_memory.py                      # Qwen2-7B shape, needs a CUDA GPU + bitsandbytes
  python bench/qlora_memory.py --tiny --steps 5     # a tiny config, runs on CPU (smoke test)
  python bench/qlora_memory.py --arms lora,qlora,qlora_fp32_upcast --out /tmp/q
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import zlib
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024 ** 3
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=2048)
ARMS = ("lora", "qlora", "qlora_fp32_upcast")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny Qwen2 config (CPU smoke test)")
    p.add_argument("--arms", default="lora,qlora", help=f"comma list of {ARMS}")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4, help="the recipe's default LoRA rate")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "qlora")
    a = p.parse_args(argv)
    a.arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    bad = [s for s in a.arms if s not in ARMS]
    if bad:
        p.error(f"--arms: unknown {bad}; choose from {ARMS}")
    return a


def qwen2_config(tiny: bool):
    from transformers import Qwen2Config

    cfg = Qwen2Config(**(TINY if tiny else QWEN2_7B), initializer_range=0.02, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def bnb_config():
    """What the project's `qlora` method loads the base with."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


# --- building the base -----------------------------------------------------------------------------

def skeleton(cfg, device: str):
    """Qwen2ForCausalLM with every parameter on the meta device (no memory), rotary buffers real."""
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    with torch.device(device):
        model.model.rotary_emb = Qwen2RotaryEmbedding(cfg)
    return model


def _fill(name: str, t: torch.Tensor, seed: int, std: float) -> None:
    """Deterministic per-tensor init: norms 1, biases 0, the rest N(0, std) from a name-derived seed."""
    if name.endswith("norm.weight"):
        t.fill_(1.0)
    elif name.endswith("bias"):
        t.zero_()
    else:
        g = torch.Generator(device=t.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        t.normal_(0.0, std, generator=g)


def materialise(module: nn.Module, prefix: str, device: str, seed: int, std: float) -> None:
    """Give every meta parameter under `module` real bf16 storage on `device`, filled by _fill."""
    for mname, mod in module.named_modules(prefix=prefix):
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            t = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
            _fill(f"{mname}.{pname}", t, seed, std)
            mod._parameters[pname] = nn.Parameter(t, requires_grad=False)


def to_nf4(lin: nn.Linear, q) -> nn.Module:
    """bnb Linear4bit holding `lin`'s weight quantised (as transformers' replace_with_bnb_linear + load)."""
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            compute_dtype=q.bnb_4bit_compute_dtype, compress_statistics=q.bnb_4bit_use_double_quant,
                            quant_type=q.bnb_4bit_quant_type, quant_storage=q.bnb_4bit_quant_storage, device="meta")
    w = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=q.bnb_4bit_use_double_quant,
                          quant_type=q.bnb_4bit_quant_type, quant_storage=q.bnb_4bit_quant_storage, module=new)
    new.weight = w.to(lin.weight.device)  # quantises here
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    new.source_cls = nn.Linear
    return new.requires_grad_(False)


def quantise_linears(module: nn.Module, q) -> None:
    for name, child in list(module.named_modules()):
        if type(child) is nn.Linear:
            module.set_submodule(name, to_nf4(child, q))


def build_base(cfg, device: str, seed: int, quantise: bool):
    """The random-weight base: bf16 everywhere, or with the decoder linears NF4 (built layer by layer)."""
    model = skeleton(cfg, device)
    std = cfg.initializer_range
    q = bnb_config() if quantise else None
    for i, layer in enumerate(model.model.layers):
        materialise(layer, f"model.layers.{i}", device, seed, std)
        if quantise:
            quantise_linears(layer, q)
    materialise(model, "", device, seed, std)  # embed_tokens, final norm, lm_head (kept bf16, never 4-bit)
    if quantise:
        model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; peft reads it
        model.quantization_method = "bitsandbytes"
        model.config.quantization_config = q
    return model


# --- adapters and training -------------------------------------------------------------------------

GC_KW = {"use_reentrant": False}


def add_lora(model, arm: str, r: int, alpha: int):
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if arm == "qlora_fp32_upcast":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=GC_KW)
    else:  # lora, qlora: freeze, checkpoint, no fp32 upcast of the non-4-bit weights
        model.requires_grad_(False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KW)
    lcfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=0.0,
                      target_modules="all-linear", bias="none")
    model = get_peft_model(model, lcfg)
    model.train()
    return model


def fixed_batch(vocab: int, batch: int, seq: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train(model, ids: torch.Tensor, steps: int, lr: float, device: str) -> tuple[list[float], list[float]]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    losses, times = [], []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(dev_type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        _sync(device)
        times.append(time.perf_counter() - t0)
    return losses, times


# --- one arm, all arms -----------------------------------------------------------------------------

def mem(device: str) -> dict[str, float]:
    if not device.startswith("cuda"):
        return {"allocated": 0.0, "peak": 0.0, "peak_reserved": 0.0}
    return {"allocated": torch.cuda.memory_allocated() / GiB, "peak": torch.cuda.max_memory_allocated() / GiB,
            "peak_reserved": torch.cuda.max_memory_reserved() / GiB}


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_arm(arm: str, cfg, args, ids: torch.Tensor) -> dict:
    free(args.device)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = build_base(cfg, args.device, args.seed, quantise=arm != "lora")
    model = add_lora(model, arm, args.r, args.alpha)
    _sync(args.device)
    build_s = time.perf_counter() - t0
    setup = mem(args.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses, times = train(model, ids, args.steps, args.lr, args.device)
    end = mem(args.device)
    del model
    free(args.device)
    steady = times[1:] or times
    return {"arm": arm, "losses": losses, "step_s": times, "step_s_median": statistics.median(steady),
            "build_s": build_s, "trainable_params": trainable, "setup_gib": setup["allocated"],
            "peak_gib": end["peak"], "peak_reserved_gib": end["peak_reserved"]}


def versions(device: str) -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "bitsandbytes"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = None
    v["gpu"] = torch.cuda.get_device_name() if device.startswith("cuda") else None
    v["cuda"] = torch.version.cuda
    return v


def print_table(rows: list[dict]) -> None:
    print(f"{'arm':<11} {'setup GiB':>9} {'peak GiB':>9} {'reserved':>9} {'trainable':>11} "
          f"{'loss first':>10} {'loss last':>9} {'s/step':>7}")
    for r in rows:
        print(f"{r['arm']:<11} {r['setup_gib']:>9.2f} {r['peak_gib']:>9.2f} {r['peak_reserved_gib']:>9.2f} "
              f"{r['trainable_params']:>11,} {r['losses'][0]:>10.4f} {r['losses'][-1]:>9.4f} {r['step_s_median']:>7.3f}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker=".",
                label=f"{r['arm']} (peak {r['peak_gib']:.1f} GiB)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (fixed batch)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = qwen2_config(args.tiny)
    ids = fixed_batch(cfg.vocab_size, args.batch, args.seq, args.seed, args.device)
    rows = [run_arm(arm, cfg, args, ids) for arm in args.arms]
    print_table(rows)
    for r in rows:
        print(f"{r['arm']} losses:", " ".join(f"{x:.4g}" for x in r["losses"]))
    by = {r["arm"]: r for r in rows}
    ratio = by["qlora"]["peak_gib"] / by["lora"]["peak_gib"] if {"lora", "qlora"} <= by.keys() and \
        by["lora"]["peak_gib"] else None
    if ratio is not None:
        print(f"qlora_peak / lora_peak = {ratio:.3f} (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")
    shape = "tiny" if args.tiny else "qwen2-7b"
    spec = TINY if args.tiny else QWEN2_7B
    result = {"shape": shape, "config": {k: v for k, v in cfg.to_dict().items() if k in spec},
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "lr": args.lr, "seed": args.seed,
              "lora": {"r": args.r, "alpha": args.alpha, "target_modules": "all-linear"},
              "bnb": bnb_config().to_dict(), "arms": rows, "peak_ratio_qlora_over_lora": ratio,
              "versions": versions(args.device)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")  # before the plot
    plot(rows, args.out / "loss_curves.png",
         f"{shape} random weights, {args.batch}x{args.seq} tokens, LoRA r={args.r}"
         + (f"; qlora/lora peak = {ratio:.2f}" if ratio is not None else ""))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'loss_curves.png'}")
    return result


if __name__ == "__main__":
    main()
