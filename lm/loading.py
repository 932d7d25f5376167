"""Loading tokenizers and models: base, and tuned from a run directory; module names of a base."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from artifacts import Manifest, RunDir
from lm.chat import ensure_chat_template
from lm.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def mixed_precision(dtype: str) -> str | None:
    """'bf16' where training should autocast to bf16, else None (fp32). auto = bf16 on capable GPUs only."""
    if dtype == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer with a chat template and pad token guaranteed (ChatML where it ships none)."""
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_chat_template(tok)
    return tok


def load_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               attn_implementation: str = "sdpa"):
    """Weights from safetensors only: a pickle checkpoint (pytorch_model.bin) can run code when loaded."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
            use_safetensors=True)
    except OSError:  # no *.safetensors in the folder (a .bin-only checkpoint), or no weights at all
        raise ConfigError(f"model.name_or_path: {path}: no safetensors weights; pickle checkpoints (.bin, .pt) are "
                          "refused: convert with save_pretrained(safe_serialization=True)") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(f"model.name_or_path: {path} needs custom code; set model.trust_remote_code=true "
                              "only if you trust it") from None
        raise ConfigError(f"model.name_or_path: {path}: {e}".splitlines()[0]) from None
    return model


def load_tuned(run: Path | str, dtype: torch.dtype = torch.float32, base_path: str | None = None):
    """(model, tokenizer) of a finished run: base + adapter/ via peft, or the full weights in model/."""
    rd = RunDir(Path(run))
    base = base_path or Manifest.read(rd.root).base_model["path"]
    return load_run_weights(rd, base, dtype), load_tokenizer(base if rd.adapter.is_dir() else str(rd.model))


def load_run_weights(rd: RunDir, base_path: str, dtype: torch.dtype = torch.float32, merge: bool = False):
    """The tuned model exactly as saved in a run directory (its manifest need not exist yet).

    merge: fold a LoRA-style adapter into the base weights (what `export merge` serves) when that is exact
    enough to score with: in float32 only (a bf16 merge rounds W + BA once more). On a CPU the merged
    model's forward is ~2x faster on full sequences (no per-layer adapter products); prompt-learning
    adapters cannot merge and stay as they are."""
    if rd.adapter.is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(base_path, dtype), str(rd.adapter))
        if merge and dtype == torch.float32 and _mergeable(model):
            model = model.merge_and_unload()
    else:
        model = load_model(str(rd.model), dtype)
    return model.to(device())


def _mergeable(model) -> bool:
    """A peft model whose adapter folds into its base's weights (LoRA and its kin), not prompt learning."""
    cfg = model.peft_config.get(model.active_adapter)
    return cfg is not None and not cfg.is_prompt_learning and hasattr(model, "merge_and_unload")


def module_names(model) -> set[str]:
    """Leaf and full dotted module names: peft stores either form in target_modules."""
    full = {n for n, _ in model.named_modules() if n}
    return full | {n.split(".")[-1] for n in full}


def module_names_from_config(path: str) -> set[str]:
    """module_names of a base model folder without loading its weights (meta device)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return module_names(model)
