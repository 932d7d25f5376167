"""vLLM's command line, from the settings and the launch plan.

vLLM gets `--enable-lora`, `--max-lora-rank` derived from the registered adapters (rounded up to a
rank vLLM allows), `--max-loras`/`--max-cpu-loras` from settings and `--max-num-seqs` from
SERVE_MAX_BATCH; no adapter (adapters.py loads each on its first request). SERVE_VLLM_ARGS comes last.
"""

from __future__ import annotations

import shlex
import sys

from serve.settings import Settings


def vllm_command(settings: Settings, base_path: str, served_name: str, max_lora_rank: int,
                 port: int, cpu: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base_path,
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(settings.max_loras),
           "--max-cpu-loras", str(vllm_adapter_capacity(settings)),
           "--max-model-len", str(settings.max_model_len),
           "--max-num-seqs", str(settings.max_batch)]  # SERVE_MAX_BATCH bounds vLLM's running batch too
    if settings.dtype != "auto":
        cmd += ["--dtype", settings.dtype]
    elif cpu:
        cmd += ["--dtype", "float32"]  # CPU: fp32 gives outputs identical to the PyTorch engine
    return cmd + shlex.split(settings.vllm_args)  # last: SERVE_VLLM_ARGS overrides any of the above


def vllm_adapter_capacity(settings: Settings) -> int:
    """The adapters vLLM holds (its --max-cpu-loras, which it requires >= --max-loras): the adapter cache's size."""
    return max(settings.max_cpu_loras, settings.max_loras)
