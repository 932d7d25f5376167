"""ONNX Runtime engine: the continuous batching of batching.py over an exported decoder (export/).

It serves one exported model (fp32 or int8 ONNX, adapters already merged in) with the KV cache
kept between decode steps, on the CPU provider here and the CUDA provider where onnxruntime-gpu
has it. Same scheduler, sampling, stop handling and streaming as the PyTorch engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lm.loading import load_tokenizer
from lm.onnx_runtime import OrtCausalLM
from serve.engines.batching import BatchingEngine, as_list


class _Cache:
    """The ORT present key/values, shaped like DynamicCache.layers for the scheduler's merge/drop.

    Decode steps pass onnxruntime's own output buffers straight back in; torch tensors are made
    only when the scheduler touches `.layers` (a row joins or leaves the batch).
    """

    def __init__(self, values: list):
        self._values = values
        self._layers = None

    @property
    def layers(self):
        if self._layers is None:
            t = [torch.from_numpy(v if isinstance(v, np.ndarray) else v.numpy()) for v in self._values]
            self._layers = [SimpleNamespace(keys=t[i], values=t[i + 1]) for i in range(0, len(t), 2)]
            self._values = None
        return self._layers

    def inputs(self) -> list:
        if self._values is not None:
            return self._values
        return [x.numpy() for layer in self._layers for x in (layer.keys, layer.values)]


class OrtEngine(BatchingEngine):
    def __init__(self, onnx_dir: str | Path, model_name: str, max_batch: int = 32, max_model_len: int = 2048,
                 threads: int = 0):
        onnx_dir = Path(onnx_dir)
        self.ort = OrtCausalLM(onnx_dir, threads=threads)
        names = self.ort.past_names
        if names != [f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}" for i in range(len(names))]:
            raise ValueError(f"{onnx_dir}: past inputs must alternate key/value per layer, got {names[:4]}...")
        tok = load_tokenizer(str(onnx_dir))
        cfg = json.loads((onnx_dir / "config.json").read_text())
        gen_path = onnx_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self.adapters: dict[str, str] = {}  # always empty: adapters are merged before export
        eos = {tok.eos_token_id} | set(as_list(gen.get("eos_token_id")))
        self._start(tok, model_name, max_batch, min(max_model_len, cfg.get("max_position_embeddings", max_model_len)),
                    eos)

    def load_adapter(self, name: str, path: str) -> None:
        raise ValueError("the ONNX engine serves one exported model; merge an adapter before export "
                         "(tunestack export merge RUN)")

    def unload_adapter(self, name: str) -> None:
        return None

    def _forward(self, ids, mask, pos, cache, adapters: list[str]):
        past = cache.inputs() if cache is not None else None
        logits, present = self.ort.run(ids.numpy(), mask.numpy(), pos.numpy(), past)
        return torch.from_numpy(np.ascontiguousarray(logits[:, -1, :])), _Cache(present)
