"""Can a server load this adapter? The checks vLLM applies at load time (vllm/lora/peft_helper.py,
vllm 0.32), run at save time, so trainer/server LoRA mismatches surface before deployment."""

from __future__ import annotations

from typing import Any

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks literal
_VLLM_OK_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_EMBEDDING_TARGETS = ("embed_tokens", "lm_head", "wte", "embed_out")


def vllm_max_lora_rank(rank: int) -> int | None:
    """Smallest rank vLLM accepts for --max-lora-rank that is >= rank; None if beyond vLLM's range."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), None)


def check_vllm(peft_config: dict[str, Any] | None, vocab_changed: bool = False) -> dict[str, Any]:
    reasons: list[str] = []
    if not peft_config:
        return {"ok": False, "reasons": ["not an adapter: serve the full weights (model/) as a base model"]}
    ptype = str(peft_config.get("peft_type", "")).upper().replace("PEFTTYPE.", "")
    if ptype != "LORA":
        return {"ok": False, "reasons": [f"vLLM serves LoRA adapters only, this is {ptype or 'unknown'}; merge it or use the Flask backend"]}
    r = int(peft_config.get("r", 0))
    ranks = [r, *(peft_config.get("rank_pattern") or {}).values()]
    need = vllm_max_lora_rank(max(ranks))
    if need is None:
        reasons.append(f"rank {max(ranks)} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
    if peft_config.get("use_dora"):
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
    targets = peft_config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    emb = [t for t in targets if any(t.endswith(e) for e in _EMBEDDING_TARGETS)]
    if emb:
        reasons.append(f"embedding/lm_head targets {emb} are not served by vLLM LoRA")
    if vocab_changed:
        reasons.append("the vocabulary was resized; vLLM LoRA needs the base vocabulary")
    return {"ok": not reasons, "reasons": reasons, "max_lora_rank": need, "rank": max(ranks)}


def check_peft(peft_config: dict[str, Any] | None) -> dict[str, Any]:
    """The Flask backend loads anything peft can load onto the same base."""
    if not peft_config:
        return {"ok": False, "reasons": ["not an adapter"]}
    return {"ok": True, "reasons": []}


def servability(peft_config: dict[str, Any] | None, vocab_changed: bool = False) -> dict[str, Any]:
    return {"vllm": check_vllm(peft_config, vocab_changed), "peft": check_peft(peft_config)}
