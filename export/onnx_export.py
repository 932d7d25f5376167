"""Model folder -> ONNX decoder with KV cache (torch.onnx dynamo exporter), verified with onnxruntime.

One graph serves prefill and decode:

    inputs   input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) float32   (P = 0 for a prefill)
    outputs  logits (B, S, vocab), present.{i}.key / .value (B, kv_heads, P+S, head_dim)

B, S and P are dynamic. Weights go to external data when the model exceeds protobuf's 2 GB.
Before anything is written the export must pass its parity check against PyTorch fp32: prefill
logits within 1e-3 on real (unpadded) positions, and 32 greedy KV-cache decode steps with
identical tokens. The result is recorded in the manifest; a failure writes nothing.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from artifacts import Manifest
from export.errors import ExportError
from export.output import commit
from lm.onnx_runtime import ONNX_FILE, OrtCausalLM
from export.source import Source
from lm.chat import encode_generation_prompt, encode_text
from lm.loading import load_model, load_tokenizer
from lm.padding import left_pad

LOGIT_TOLERANCE = 1e-3  # fp32 ORT vs PyTorch: kernels differ in summation order only
GREEDY_STEPS = 32
PARITY_PROMPTS = [[{"role": "user", "content": "What is the main ingredient of the house stew?"}],
                  [{"role": "user", "content": "Name three spices. Answer in one short sentence."}]]
PARITY_TEXTS = ["The chef walked into the kitchen and"]
TWO_GB = 2 * 1024 ** 3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json", "vocab.json", "merges.txt", "tokenizer.model")


class _DecoderWithPast(torch.nn.Module):
    """Flat tensors in and out, so the exporter sees plain inputs instead of a Cache object."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_kv):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(len(past_kv) // 2):
            cache.update(past_kv[2 * i], past_kv[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        flat = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *flat)


def io_description(config) -> dict:
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return {"inputs": ["input_ids", "attention_mask", "position_ids", *past], "outputs": ["logits", *present],
            "past_inputs": past, "present_outputs": present, "num_layers": layers,
            "num_key_value_heads": heads, "head_dim": head_dim, "dtype": "float32"}


def _export(model, io: dict, path: Path) -> None:
    from torch.export import Dim

    b, s, p = 2, 3, 5  # distinct sizes > 1, so the exporter cannot specialise any axis
    cfg = model.config
    args = (torch.randint(0, cfg.vocab_size, (b, s)), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).expand(b, s).contiguous(),
            tuple(torch.randn(b, io["num_key_value_heads"], p, io["head_dim"]) for _ in io["past_inputs"]))
    batch, seq, past = Dim("batch"), Dim("seq"), Dim("past_seq")
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO},
               "position_ids": {0: batch, 1: seq}, "past_kv": tuple({0: batch, 2: past} for _ in io["past_inputs"])}
    big = sum(t.numel() * t.element_size() for t in model.parameters()) > TWO_GB
    with torch.no_grad():
        program = torch.onnx.export(_DecoderWithPast(model).eval(), args, dynamo=True, dynamic_shapes=dynamic,
                                    input_names=io["inputs"], output_names=io["outputs"], optimize=True,
                                    external_data=big, verbose=False)
    program.save(str(path), external_data=big)


@torch.no_grad()
def _torch_greedy(model, ids, mask, pos, steps: int) -> np.ndarray:
    from transformers import DynamicCache

    cache, out = DynamicCache(), []
    for _ in range(steps):
        o = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        cache, nxt = o.past_key_values, o.logits[:, -1].argmax(-1)
        out.append(nxt.numpy())
        ids, pos = nxt[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return np.stack(out, 1)


def parity(model, tok, ort_model: OrtCausalLM, steps: int = GREEDY_STEPS) -> dict:
    """Prefill logits diff on real positions and greedy KV-cache decode agreement, ORT vs PyTorch."""
    prompts = [encode_generation_prompt(tok, m) for m in PARITY_PROMPTS] + [encode_text(tok, t) for t in PARITY_TEXTS]
    ids, mask, pos = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    got, _ = ort_model.run(ids.numpy(), mask.numpy(), pos.numpy(), None)
    real = mask.numpy().astype(bool)
    diff = float(np.abs(got - ref)[real].max())
    want = _torch_greedy(model, ids, mask, pos, steps)
    have = ort_model.generate(ids, mask, steps, eos_token_id=None, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:].numpy()
    return {"max_abs_logit_diff": diff, "logit_tolerance": LOGIT_TOLERANCE, "greedy_steps": steps,
            "greedy_equal": bool(np.array_equal(want, have)),
            "greedy_first_mismatch": None if np.array_equal(want, have) else int((want != have).any(0).argmax()),
            "prompts": len(prompts), "ok": diff <= LOGIT_TOLERANCE and bool(np.array_equal(want, have))}


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def export_onnx(source: Source, out: Path, *, replace: bool = False, threads: int = 0) -> dict:
    """Export, check parity, then write `out` atomically (model.onnx, tokenizer, config, manifest)."""
    if out.exists() and not replace:
        raise ExportError(f"{out}: exists; pass --force to replace it")
    tok = load_tokenizer(str(source.model_dir))
    model = load_model(str(source.model_dir), torch.float32, attn_implementation="eager").eval()
    model.config.use_cache = True
    io = io_description(model.config)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".onnx-") as work:
        work = Path(work)
        _export(model, io, work / ONNX_FILE)
        seconds = time.time() - t0
        copy_tokenizer(source.model_dir, work)
        tok.save_pretrained(work)  # the chat template the run trained with travels with the model
        man = Manifest(kind="model", name=out.name, method="onnx", base_model=source.base_model,
                       peft_config=source.manifest.peft_config if source.manifest else None,
                       metrics=source.manifest.metrics if source.manifest else {},
                       extra={"source": str(source.model_dir.resolve()), "run": str(source.run) if source.run else None,
                              "onnx": {"io": io, "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
                                       "opset": _opset(work / ONNX_FILE), "export_seconds": round(seconds, 1)}})
        man.write(work)  # OrtCausalLM reads the io description from it
        ref = load_model(str(source.model_dir), torch.float32).eval()  # the serving attention (sdpa) as reference
        check = parity(ref, tok, OrtCausalLM(work, threads=threads))
        man.extra["onnx"]["parity"] = check
        if not check["ok"]:
            raise ExportError(f"{source.model_dir}: ONNX parity check failed (max |logit diff| "
                              f"{check['max_abs_logit_diff']:.2e}, greedy equal {check['greedy_equal']}); nothing written")
        commit(work, out, man, replace=replace)
    return {"path": str(out), "parity": check, "export_seconds": round(seconds, 1)}


def _opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
