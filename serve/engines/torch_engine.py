"""PyTorch engine: continuous batching (batching.py) of mixed-adapter requests over one base model.

Requests for different adapters share every forward pass: each row goes through its own LoRA
weights, either by the fused multi-LoRA hooks (multi_lora.py, default) or by peft's mixed-adapter
batch inference (`adapter_names=`, lora_impl="peft"), which the fused path is tested against.
With the fused path, Llama-family models run on the lean forward (decoder.py: fused, prepacked
projections and an in-place KV cache); others, or lean=False, on transformers' forward.
Adapters are registered, then loaded on their first request and evicted least recently used
(adapter_cache.py): at most `max_loaded_adapters` are held.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache

from lm.loading import load_model, load_tokenizer

from serve.engines import attention, decoder
from serve.engines.adapter_cache import AdapterCache, Refusal
from serve.engines.base import EngineStats, GenRequest
from serve.engines.batching import BASE, STOPPED, BatchingEngine, as_list
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
                 cpu_on_gpu_host: bool = False, max_loaded_adapters: int = 32, metrics=None):
        """cpu_on_gpu_host: serve on the CPU although a GPU is present (refused by default: vLLM uses it).
        max_loaded_adapters: adapters whose weights are held (SERVE_MAX_LOADED_ADAPTERS); metrics: serve.metrics's."""
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
        self.cache = AdapterCache(max_loaded_adapters, self._read, self._install, self._evict, metrics)
        self.adapters = self.cache.held  # the weights held (see BatchingEngine.adapters), least recently used first
        cfg_len = getattr(self.base.config, "max_position_embeddings", max_model_len)
        eos = {tok.eos_token_id} | set(as_list(getattr(self.base.generation_config, "eos_token_id", None)))
        self._start(tok, model_name, max_batch, min(max_model_len, cfg_len), eos)

    def load_adapter(self, name: str, path: str) -> None:
        """Make `name` servable from `path`; its weights load on its first request. The adapter's files are
        checked here (fused: the safetensors header against the base), so a bad file is refused at once.
        A re-publish of a held adapter reads the new weights now and swaps them in one step, as before."""
        try:
            if self.lora is not None:
                self.lora.read(name, path, meta=True)
            if self.adapters.get(name, path) != path:
                self._call(self.cache.replace, name, path, self._read(name, path), adapter=name)
        except Exception:
            if name in self.cache.registered():  # a bad re-publish: the sync marks the name failed, so nothing
                self.unload_adapter(name)  # of its previous version may stay held or registered
            raise
        self.cache.register(name, path)

    def unload_adapter(self, name: str) -> None:
        """No longer serve `name`: once no running row uses it, its weights go and its parked requests fail."""
        self.cache.unregister(name)
        self._call(self._forget_adapter, name, adapter=name)

    def _read(self, name: str, path: str):
        """Any thread: the fused path reads and checks the weights here; peft reads them on install."""
        return self.lora.read(name, path) if self.lora is not None else path

    def stats(self) -> EngineStats:
        s = super().stats()
        return EngineStats(running=s.running, waiting=s.waiting + self.cache.parked)  # parked: waiting for a load

    # -- engine thread -----------------------------------------------------------
    def _run_commands(self) -> None:
        super()._run_commands()
        in_use = {r.req.adapter for r in self._rows} | {r.adapter for r in self._backlog}
        settled = self.cache.settle(in_use)
        self._backlog.extendleft(reversed(settled.resumed))  # first in line: they waited for the load
        for reqs, refusal in settled.failed:
            self._fail(reqs, refusal.message, not_found=refusal.gone)

    def _not_held(self, req: GenRequest) -> Refusal | None:
        return self.cache.park(req.adapter, req)

    def _close(self) -> None:
        self._fail(self.cache.close(), STOPPED)
        super()._close()

    def _forget_adapter(self, name: str) -> None:
        reqs, refusal = self.cache.forget(name)
        self._fail(reqs, refusal.message, not_found=refusal.gone)

    def _install(self, name: str, path: str, weights, victims: tuple[str, ...]) -> None:
        """Install `name` in place of `victims` (the cache then records both)."""
        if self.lora is not None:
            self.lora.install(name, weights, evict=victims)  # replaces a same-named adapter; one rebuild
            return
        from peft import PeftModel

        for victim in victims:
            self._evict(victim)
        if name in self.adapters:
            self._evict(name)
        if self.model is self.base:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        else:
            self.model.load_adapter(path, adapter_name=name)

    def _evict(self, name: str) -> None:
        """Drop `name`'s weights (the cache then forgets it is held)."""
        if self.lora is not None:
            self.lora.unload(name)
        elif len(self.adapters) == 1:
            self.model = self.model.unload()  # last adapter: back to the plain base model
        else:
            self.model.delete_adapter(name)

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
