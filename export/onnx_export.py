"""Model folder -> ONNX decoder with KV cache (torch.onnx dynamo exporter), verified with onnxruntime.

One graph serves prefill and decode:

    inputs   input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) float32   (P = 0 for a prefill)
    outputs  logits (B, S, vocab), present.{i}.key / .value (B, kv_heads, P+S, head_dim)

B, S and P are dynamic. Weights go to external data when the model exceeds protobuf's 2 GB.
Before anything is written the export must pass its parity check against PyTorch fp32: prefill
logits within 1e-3 on real (unpadded) positions, and 32 greedy KV-cache decode steps whose logits
are within 1e-3 too. The decode is teacher-forced: onnxruntime is fed PyTorch's greedy tokens, so
a near-tie (two tokens whose logits differ by less than the tolerance, where either is a correct
argmax) cannot send the two decodes down different texts and fail a correct export. A token that
onnxruntime would choose differently with a clear margin fails it. The result is recorded in the
manifest; a failure writes nothing.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)
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


def _export(model, io: dict, path: Path) -> str:
    """Export to `path`; returns which graph optimisation ran (optimize_graph)."""
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
                                    input_names=io["inputs"], output_names=io["outputs"], optimize=False,
                                    external_data=big, verbose=False)
    optimizer = optimize_graph(program)
    program.save(str(path), external_data=big)
    return optimizer


def optimize_graph(program) -> str:
    """Constant folding and clean-up passes, not torch.onnx's optimize=True.

    optimize=True adds onnxscript's pattern rewriter: 408,000 rule matches, ~25 s of a 90 s SmolLM2
    export on 2 cores, for no onnxruntime speed (ORT fuses the graph itself when a session opens:
    decode tokens/s within noise of each other, docs/export.md). Should onnxscript's or onnx_ir's pass
    API change, torch's own optimize() runs instead, with one log line. Returns which ran."""
    try:
        _light_passes(program.model)
        return "light"
    except Exception as e:  # noqa: BLE001 (any failure of an external pass API: torch's optimizer still works)
        log.warning("ONNX light optimisation unavailable (%s: %s); using torch.onnx's optimizer",
                    type(e).__name__, e)
        program.optimize()
        return "torch"


def _light_passes(model) -> None:
    """onnxscript's optimize_ir without its rewriter: inline, fold constants, drop what is unused,
    lift constants to initializers, deduplicate, common subexpressions, fix names."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants_ir

    common.InlinePass()(model)
    fold_constants_ir(model, onnx_shape_inference=True)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass())(model)


@torch.no_grad()
def _torch_greedy(model, ids, mask, pos, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's greedy tokens (B, steps) and the last-position logits each was chosen from (B, steps, V)."""
    from transformers import DynamicCache

    cache, tokens, logits = DynamicCache(), [], []
    for _ in range(steps):
        o = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        cache, last = o.past_key_values, o.logits[:, -1]
        nxt = last.argmax(-1)
        tokens.append(nxt.numpy())
        logits.append(last.numpy())
        ids, pos = nxt[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return np.stack(tokens, 1), np.stack(logits, 1)


def _ort_forced(ort_model: OrtCausalLM, ids, mask, pos, tokens: np.ndarray) -> np.ndarray:
    """onnxruntime's last-position logits (B, steps, V) when fed `tokens` one by one through its KV cache."""
    ids, mask, pos = ids.numpy(), mask.numpy().astype(np.int64), pos.numpy()
    past, out = None, []
    for t in range(tokens.shape[1]):
        logits, past = ort_model.run(ids, mask, pos, past)
        out.append(logits[:, -1])
        ids, pos = tokens[:, t:t + 1], pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], 1)
    return np.stack(out, 1)


def _mismatches(want: np.ndarray, ref: np.ndarray, got: np.ndarray) -> tuple[int, int]:
    """(steps where onnxruntime's argmax differs, of those the ones PyTorch's own margin does not excuse).

    A mismatch is excused when PyTorch's chosen token beats onnxruntime's choice by at most the tolerance."""
    have = got.argmax(-1)
    differ = have != want
    margin = np.take_along_axis(ref, want[..., None], -1)[..., 0] - np.take_along_axis(ref, have[..., None], -1)[..., 0]
    return int(differ.sum()), int((differ & (margin > LOGIT_TOLERANCE)).sum())


def parity(model, tok, ort_model: OrtCausalLM, steps: int = GREEDY_STEPS) -> dict:
    """Prefill logits diff on real positions, and a teacher-forced greedy KV-cache decode, ORT vs PyTorch."""
    prompts = [encode_generation_prompt(tok, m) for m in PARITY_PROMPTS] + [encode_text(tok, t) for t in PARITY_TEXTS]
    ids, mask, pos = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    got, _ = ort_model.run(ids.numpy(), mask.numpy(), pos.numpy(), None)
    diff = float(np.abs(got - ref)[mask.numpy().astype(bool)].max())
    want, ref_steps = _torch_greedy(model, ids, mask, pos, steps)
    got_steps = _ort_forced(ort_model, ids, mask, pos, want)
    decode_diff = float(np.abs(got_steps - ref_steps).max())
    mismatches, clear = _mismatches(want, ref_steps, got_steps)
    return {"max_abs_logit_diff": diff, "decode_max_abs_logit_diff": decode_diff, "logit_tolerance": LOGIT_TOLERANCE,
            "greedy_steps": steps, "greedy_equal": mismatches == 0, "near_tie_mismatches": mismatches - clear,
            "clear_mismatches": clear, "prompts": len(prompts),
            "ok": max(diff, decode_diff) <= LOGIT_TOLERANCE and clear == 0}


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def export_onnx(source: Source, out: Path, *, replace: bool = False, threads: int = 0) -> dict:
    """Export, check parity, then write `out` atomically (model.onnx, tokenizer, config, manifest)."""
    if out.exists() and not replace:
        raise ExportError(f"{out}: exists; pass --overwrite to replace it")
    tok = load_tokenizer(str(source.model_dir))
    model = load_model(str(source.model_dir), torch.float32, attn_implementation="eager").eval()
    model.config.use_cache = True
    io = io_description(model.config)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".onnx-") as work:
        work = Path(work)
        optimizer = _export(model, io, work / ONNX_FILE)
        seconds = time.time() - t0
        copy_tokenizer(source.model_dir, work)
        tok.save_pretrained(work)  # the chat template the run trained with travels with the model
        man = Manifest(kind="model", name=out.name, method="onnx", base_model=source.base_model,
                       peft_config=source.manifest.peft_config if source.manifest else None,
                       metrics=source.manifest.metrics if source.manifest else {},
                       extra={"source": str(source.model_dir.resolve()), "run": str(source.run) if source.run else None,
                              "onnx": {"io": io, "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
                                       "opset": _opset(work / ONNX_FILE), "export_seconds": round(seconds, 1),
                                       "graph_optimizer": optimizer}})
        man.write(work)  # OrtCausalLM reads the io description from it
        ref = load_model(str(source.model_dir), torch.float32).eval()  # the serving attention (sdpa) as reference
        check = parity(ref, tok, OrtCausalLM(work, threads=threads))
        man.extra["onnx"]["parity"] = check
        if not check["ok"]:
            raise ExportError(f"{source.model_dir}: ONNX parity check failed (max |logit diff| "
                              f"{check['max_abs_logit_diff']:.2e} prefill, {check['decode_max_abs_logit_diff']:.2e} decode; "
                              f"{check['clear_mismatches']} decode steps choose another token); nothing written")
        commit(work, out, man, replace=replace)
    return {"path": str(out), "parity": check, "export_seconds": round(seconds, 1)}


def _opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
