"""The one list of model architectures the stack supports, and what each path supports.

A path is a way of running the model that relies on the architecture's shape:
  onnx  export/: a decoder whose KV cache is one (batch, kv_heads, seq, head_dim) key and value per
        layer, and whose HF forward accepts position_ids;
  lean  serve's lean decoder (serve/engines/decoder.py): Llama-style blocks (RMSNorm, fused-able
        q/k/v and gate/up projections, rotary embedding without per-head norms).
Any causal LM that transformers loads trains, merges and serves on transformers' own forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Architecture:
    model_type: str
    onnx: bool  # python -m export onnx
    lean: bool  # the serving engine's lean forward (else transformers' forward)
    note: str = ""


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", onnx=True, lean=True),
    Architecture("mistral", onnx=True, lean=True, note="full attention only (no sliding window) on the lean path"),
    Architecture("qwen2", onnx=True, lean=True, note="full attention only (use_sliding_window=false) on the lean path"),
    Architecture("qwen3", onnx=True, lean=False, note="q/k RMSNorm per head: not on the lean path"),
)}


def supported(path: str) -> tuple[str, ...]:
    """Model types supported by a path ("onnx" or "lean")."""
    return tuple(t for t, a in ARCHITECTURES.items() if getattr(a, path))


def read_model_type(model_dir: Path | str) -> str:
    """config.json's model_type; raises FileNotFoundError / ValueError on a folder that is not an HF model."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    try:
        return str(json.loads(cfg.read_text(encoding="utf-8")).get("model_type", ""))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg}: not valid JSON: {e}") from None


def architecture_name(model_dir: Path | str) -> str | None:
    """config.json's first `architectures` entry (e.g. LlamaForCausalLM), None if absent."""
    cfg = Path(model_dir) / "config.json"
    if cfg.is_file():
        return (json.loads(cfg.read_text()).get("architectures") or [None])[0]
    return None
