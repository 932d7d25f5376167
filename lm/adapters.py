"""Adapter rules, once for every stage: an adapter's rank and targets, and whether a server can load it.

Two servers read the registry:
  vllm   the checks vLLM applies at load time (vllm/lora/peft_helper.py, vllm 0.32);
  flask  the PyTorch engine's mixed-adapter batch: plain LoRA only (DoRA, IA3 and prompt tuning are
         merged and served as models), rank within the server's limit, targets present in the base.
Training records both verdicts in the manifest at save time, so a trainer/server mismatch surfaces
before deployment; serving applies them again, with its own limits, before loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks literal
_VLLM_OK_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_EMBEDDING_TARGETS = ("embed_tokens", "lm_head", "wte", "embed_out")


@dataclass(frozen=True)
class AdapterSpec:
    """What the rules read from a peft config (adapter_config.json / a manifest's peft_config)."""

    peft_type: str  # LORA, IA3, PROMPT_TUNING... ('' if absent)
    rank: int  # the largest rank of any module: r, or a larger rank_pattern entry
    targets: tuple[str, ...]  # target module names; () for 'all-linear' (every linear layer)
    use_dora: bool

    @classmethod
    def of(cls, peft_config: dict[str, Any] | None) -> "AdapterSpec":
        pc = peft_config or {}
        ptype = str(pc.get("peft_type", "")).upper().replace("PEFTTYPE.", "")
        targets = pc.get("target_modules") or []
        if isinstance(targets, str):
            targets = [] if targets == "all-linear" else [targets]
        return cls(ptype, lora_rank(pc), tuple(targets), bool(pc.get("use_dora")))


def lora_rank(peft_config: dict[str, Any] | None) -> int:
    """The largest LoRA rank in the adapter: `r`, or any larger per-module `rank_pattern` entry."""
    pc = peft_config or {}
    return max([int(pc.get("r", 0) or 0), *(int(v) for v in (pc.get("rank_pattern") or {}).values())])


def vllm_max_lora_rank(rank: int) -> int | None:
    """Smallest rank vLLM accepts for --max-lora-rank that is >= rank; None if beyond vLLM's range."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), None)


def check_vllm(peft_config: dict[str, Any] | None, vocab_changed: bool = False) -> dict[str, Any]:
    if not peft_config:
        return {"ok": False, "reasons": ["not an adapter: serve the full weights (model/) as a base model"]}
    spec = AdapterSpec.of(peft_config)
    if spec.peft_type != "LORA":
        return {"ok": False, "reasons": [f"vLLM serves LoRA adapters only, this is {spec.peft_type or 'unknown'}; "
                                         "merge it or use the Flask backend"]}
    reasons: list[str] = []
    need = vllm_max_lora_rank(spec.rank)
    if need is None:
        reasons.append(f"rank {spec.rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
    if spec.use_dora:
        reasons.append("vLLM does not support DoRA; merge the adapter or use the Flask backend")
    mts = [m for m in (peft_config.get("modules_to_save") or []) if m not in ("classifier", "score")]
    if mts:
        reasons.append(f"vLLM does not support modules_to_save {mts}")
    if peft_config.get("bias", "none") != "none" or peft_config.get("lora_bias"):
        reasons.append("vLLM does not support LoRA bias")
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _VLLM_OK_INITS:
        reasons.append(f"vLLM does not support init_lora_weights={init!r}")
    if peft_config.get("layer_replication"):
        reasons.append("vLLM does not support layer_replication")
    emb = [t for t in spec.targets if any(t.endswith(e) for e in _EMBEDDING_TARGETS)]
    if emb:
        reasons.append(f"embedding/lm_head targets {emb} are not served by vLLM LoRA")
    if vocab_changed:
        reasons.append("the vocabulary was resized; vLLM LoRA needs the base vocabulary")
    return {"ok": not reasons, "reasons": reasons, "max_lora_rank": need, "rank": spec.rank}


def mixed_batch_refusal(peft_config: dict[str, Any] | None, max_rank: int | None = None,
                        base_modules: set[str] | None = None) -> str | None:
    """Why an adapter cannot join a mixed-adapter batch (None: it can). max_rank and base_modules are
    the server's own limits; left out, only the adapter's type is judged (as training does)."""
    spec = AdapterSpec.of(peft_config)
    if spec.peft_type != "LORA":
        return f"peft type {spec.peft_type or 'unknown'}: only LoRA adapters can share a mixed batch; merge it instead"
    if spec.use_dora:
        return "DoRA adapters cannot share a mixed batch; merge it and serve it as a model"
    if max_rank is not None and spec.rank > max_rank:
        return f"LoRA rank {spec.rank} exceeds this server's max LoRA rank {max_rank}"
    missing = sorted(set(spec.targets) - base_modules) if base_modules is not None else []
    if missing:
        return f"target modules {missing} do not exist in the base model"
    return None


def check_flask(peft_config: dict[str, Any] | None) -> dict[str, Any]:
    """The Flask backend's PyTorch engine: a LoRA joins mixed batches; anything else is merged first."""
    if not peft_config:
        return {"ok": False, "reasons": ["not an adapter: serve the full weights (model/) as a base model"]}
    reason = mixed_batch_refusal(peft_config)
    return {"ok": reason is None, "reasons": [reason] if reason else [], "rank": lora_rank(peft_config)}


def servability(peft_config: dict[str, Any] | None, vocab_changed: bool = False) -> dict[str, Any]:
    return {"vllm": check_vllm(peft_config, vocab_changed), "flask": check_flask(peft_config)}
