"""Running an exported decoder with ONNX Runtime: prefill and KV-cache decode, batched.

The graph (written by export/onnx_export.py) takes input_ids, attention_mask, position_ids and a key
and value per layer (batch, kv_heads, past, head_dim; past = 0 for a prefill) and returns logits
and the present key/values (past + new). `OrtCausalLM` also answers the two calls the training
evaluation (lm/evaluation.py) makes on a model (`model(input_ids, attention_mask).logits` and greedy
`generate`), so ONNX exports are scored by exactly the code that scored the PyTorch run.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from artifacts import Manifest
from lm.padding import positions

ONNX_FILE = "model.onnx"


def providers() -> list[str]:
    """GPU providers where onnxruntime-gpu offers them, then the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OrtCausalLM:
    def __init__(self, onnx_dir: Path | str, threads: int = 0, provider_list: list[str] | None = None):
        import onnxruntime as ort

        self.dir = Path(onnx_dir)
        self.manifest = Manifest.read(self.dir)
        self.io = self.manifest.extra["onnx"]["io"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # warnings about unused initializers are noise here
        self.session = ort.InferenceSession(str(self.dir / ONNX_FILE), so, providers=provider_list or providers())
        self.heads, self.head_dim = self.io["num_key_value_heads"], self.io["head_dim"]
        self.past_names = self.io["past_inputs"]
        self.device = torch.device("cpu")

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.heads, 0, self.head_dim), np.float32) for _ in self.past_names]

    def run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list | None) -> tuple[np.ndarray, list]:
        """(logits (B, S, V), present key/values in past_inputs order, as OrtValues).

        past: None (prefill), numpy arrays, or the OrtValues a previous call returned. The cache
        stays in onnxruntime's buffers between decode steps (IO binding): no copy out and back in.
        """
        past = self.empty_past(ids.shape[0]) if past is None else past
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(pos, dtype=np.int64))
        for name, value in zip(self.past_names, past):
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                io.bind_ortvalue_input(name, value)
        for name in self.io["outputs"]:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), list(out[1:])

    # -- the model interface lm/evaluation.py uses -----------------------------
    def eval(self) -> "OrtCausalLM":
        return self

    def parameters(self):
        yield torch.empty(0)  # evaluate.py reads the device from the first parameter

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> SimpleNamespace:
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        pos = positions(mask)
        logits, _ = self.run(input_ids.numpy(), mask.numpy(), pos.numpy(), None)
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int = 0, **_) -> torch.Tensor:
        """Greedy decode with the KV cache (left-padded batch); rows that hit EOS are padded after it."""
        eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
        ids, mask = input_ids.numpy(), attention_mask.numpy().astype(np.int64)
        pos = positions(attention_mask).numpy()
        done = np.zeros(ids.shape[0], bool)
        out, past = [], None
        cur = ids
        for _ in range(max_new_tokens):
            logits, past = self.run(cur, mask, pos, past)
            nxt = logits[:, -1].argmax(-1)
            nxt = np.where(done, pad_token_id, nxt)
            out.append(nxt)
            done |= np.isin(nxt, list(eos))
            if done.all():
                break
            cur, pos = nxt[:, None], pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], 1)
        gen = np.stack(out, 1) if out else np.zeros((ids.shape[0], 0), np.int64)
        return torch.from_numpy(np.concatenate([ids, gen], 1))
