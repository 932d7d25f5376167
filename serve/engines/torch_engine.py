"""PyTorch engine: continuous batching (batching.py) of mixed-adapter requests over one base model.

Requests for different adapters share every forward pass: each row goes through its own LoRA
weights, either by the fused multi-LoRA hooks (multi_lora.py, default) or by peft's mixed-adapter
batch inference (`adapter_names=`, lora_impl="peft"), which the fused path is tested against.
With the fused path, Llama-family models run on the lean forward (decoder.py: fused, prepacked
projections and an in-place KV cache); others, or lean=False, on transformers' forward.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache

from lm.loading import load_model, load_tokenizer

from serve.engines import attention, decoder
from serve.engines.batching import BASE, BatchingEngine, as_list
from serve.engines.multi_lora import MultiLoRA

log = logging.getLogger("serve.engine")


class GPUHostRefused(ValueError):
    """The torch engine runs on the CPU only: on a GPU machine it would leave the GPU idle, silently."""


def refuse_gpu_host(cpu_on_gpu_host: bool) -> None:
    """Raise GPUHostRefused on a machine with a CUDA GPU, unless CPU serving there was asked for."""
    if torch.cuda.is_available() and not cpu_on_gpu_host:
        raise GPUHostRefused(
            "this machine has a CUDA GPU, but the Flask backend's torch engine runs on the CPU only; serve on the "
            "GPU with the vLLM backend (SERVE_BACKEND=vllm), or set SERVE_CPU_ON_GPU_HOST=1 to serve on the CPU anyway")


class TorchEngine(BatchingEngine):
    def __init__(self, base_path: str, model_name: str, max_batch: int = 32, max_model_len: int = 2048,
                 threads: int = 0, dtype: torch.dtype = torch.float32, lora_impl: str = "fused", lean: bool = True,
                 cpu_on_gpu_host: bool = False):
        """cpu_on_gpu_host: serve on the CPU although a GPU is present (refused by default: vLLM uses it)."""
        refuse_gpu_host(cpu_on_gpu_host)
        if threads:
            torch.set_num_threads(threads)
        tok = load_tokenizer(base_path)  # the chat template training used (ChatML where the model has none)
        self.base = load_model(base_path, dtype, attn_implementation=attention.NAME).eval()
        self.model = self.base  # lora_impl=peft: becomes a PeftModel once an adapter is loaded
        self.lora_impl = lora_impl
        self.lora = MultiLoRA(self.base) if lora_impl == "fused" else None
        # The lean forward (decoder.py) for Llama-family models with fused LoRA; transformers' forward otherwise.
        self.lean = None
        if lean and self.lora is not None:
            try:
                self.lean = decoder.LeanDecoder(self.base, self.lora, rows=max_batch)
            except decoder.Unsupported as e:
                log.info("transformers forward (no lean path: %s)", e)
        log.info("torch engine: %s forward, %s, %s LoRA", "lean" if self.lean else "transformers",
                 str(dtype).removeprefix("torch."), lora_impl)
        self.adapters: dict[str, str] = {}  # the weights held (see BatchingEngine.adapters)
        cfg_len = getattr(self.base.config, "max_position_embeddings", max_model_len)
        eos = {tok.eos_token_id} | set(as_list(getattr(self.base.generation_config, "eos_token_id", None)))
        self._start(tok, model_name, max_batch, min(max_model_len, cfg_len), eos)

    def load_adapter(self, name: str, path: str) -> None:
        if self.lora is not None:  # files are read and checked here, off the engine thread: decoding goes on
            self._call(self._install_adapter, name, path, self.lora.read(name, path), adapter=name)
        else:
            self._call(self._load_adapter, name, path, adapter=name)

    def unload_adapter(self, name: str) -> None:
        self._call(self._unload_adapter, name, adapter=name)

    # -- engine thread -----------------------------------------------------------
    def _install_adapter(self, name: str, path: str, weights: dict) -> None:
        self.lora.install(name, weights)  # replaces a same-named adapter in one step
        self.adapters[name] = path

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if name in self.adapters:
            self._unload_adapter(name)
        if self.model is self.base:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        else:
            self.model.load_adapter(path, adapter_name=name)
        self.adapters[name] = path

    def _unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            return
        if self.lora is not None:
            self.lora.unload(name)
            del self.adapters[name]
            return
        if len(self.adapters) == 1:
            self.model = self.model.unload()  # last adapter: back to the plain base model
        else:
            self.model.delete_adapter(name)
        del self.adapters[name]

    def _forward(self, ids, mask, pos, cache, adapters: list[str]):
        if self.lean is not None:
            self.lora.set_rows([None if a == BASE else a for a in adapters])
            return self.lean.forward(ids, mask, pos, cache)
        kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
              "past_key_values": cache if cache is not None else DynamicCache(), "use_cache": True,
              "logits_to_keep": 1}  # only the last position is sampled: skips the (T x vocab) head in prefill
        if self.lora is not None:
            self.lora.set_rows([None if a == BASE else a for a in adapters])
        elif self.model is not self.base:
            kw["adapter_names"] = adapters
        with torch.inference_mode():
            out = self.model(**kw)
        return out.logits[:, -1, :].float(), out.past_key_values
