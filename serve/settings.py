"""Server settings: one typed object read from the environment (SERVE_*), overridable by CLI flags.

Compose and Kubernetes set these without code changes. Unsafe values are refused at start.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Settings:
    registry: Path = field(default=Path("registry"), metadata={"help": "model registry to serve (base + adapters)"})
    backend: str = field(default="flask", metadata={"help": "flask (CPU/edge, PyTorch engine) or vllm (GPU production)"})
    host: str = field(default="127.0.0.1", metadata={"help": "bind address; 0.0.0.0 in containers"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    api_key: str = field(default="", metadata={"help": "Bearer key for /v1/*; empty = no auth (local use only)"})
    admin_key: str = field(default="", metadata={"help": "Bearer key for /admin/*; empty = admin API off"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "larger bodies get 413; 1 MiB fits any chat"})
    max_upload_bytes: int = field(default=512 << 20, metadata={"help": "POST /v1/files: larger training files get 413; 512 MiB is ~100k long chat rows"})
    finetune_worker: str = field(default="auto", metadata={"help": "fine-tuning jobs: auto = run `python -m train worker` beside the server when the training stack is installed (one box); on = that, or exit 2; off = jobs wait for an external worker (compose's trainer service); k8s = each job becomes a batch/v1 Job"})
    finetune_dir: str = field(default="", metadata={"help": "where uploaded files and jobs live; empty = <registry>/.finetune (set it where the registry is mounted read-only)"})
    finetune_job_template: Path = field(default=Path("/etc/tunestack/train-job.yaml"), metadata={"help": "SERVE_FINETUNE_WORKER=k8s: the training Job template (k8s/base/train-job.yaml, mounted from a ConfigMap)"})
    finetune_namespace: str = field(default="tunestack", metadata={"help": "SERVE_FINETUNE_WORKER=k8s: the namespace Jobs are created in (the serving pod's own)"})
    finetune_worker_args: str = field(default="", metadata={"help": "overrides for every job the local worker runs, space-separated section.field=value (e.g. eval sizes)"})
    upload_timeout: float = field(default=600.0, metadata={"help": "seconds a training-file upload may take to arrive (512 MiB at ~1 MB/s)"})
    max_batch: int = field(default=32, metadata={"help": "sequences decoded together (the Flask engine's batch; vLLM's --max-num-seqs); CPU throughput peaks near 32, GPU overlays raise it"})
    max_model_len: int = field(default=2048, metadata={"help": "prompt + max_tokens limit (capped by the model)"})
    max_lora_rank: int = field(default=64, metadata={"help": "larger adapters are refused (vLLM needs it at start)"})
    max_loras: int = field(default=8, metadata={"help": "vLLM: adapters resident on the GPU at once"})
    max_cpu_loras: int = field(default=32, metadata={"help": "vLLM: adapters cached in host memory"})
    poll_seconds: float = field(default=0.5, metadata={"help": "registry poll period; publish -> servable in < 2 s"})
    engine: str = field(default="torch", metadata={"help": "Flask backend engine: torch (base + LoRA adapters) or onnx (an exported model)"})
    model: str = field(default="", metadata={"help": "engine=onnx: registry models/<name> to serve; empty = the only ONNX model there"})
    lora_impl: str = field(default="fused", metadata={"help": "Flask engine LoRA path: fused (fast) or peft (reference)"})
    dtype: str = field(default="auto", metadata={"help": "weights: auto (fp32 on CPU, the model's own on GPU vLLM), float32, bfloat16 (CPUs with AVX512-BF16/AMX), float16 (GPU vLLM)"})
    forward: str = field(default="lean", metadata={"help": "torch engine forward: lean (fused, prepacked; Llama-family, else falls back) or transformers"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = all cores"})
    http_threads: int = field(default=64, metadata={"help": "concurrent HTTP connections (gunicorn gthread)"})
    body_timeout: float = field(default=30.0, metadata={"help": "seconds a request body may take to arrive; a client that trickles or stalls gets 408 and frees its thread (a 64 KiB chat arrives in ms)"})
    drain_seconds: float = field(default=25.0, metadata={"help": "after SIGTERM, seconds in-flight requests get to finish while new ones get 503; fits k8s terminationGracePeriodSeconds 60 = preStop sleep 10 + drain 25 + worker stop 5 + vLLM child stop <= 20"})
    cpu_on_gpu_host: bool = field(default=False, metadata={"help": "let the torch engine serve on the CPU of a machine with a GPU; refused by default, as vLLM (SERVE_BACKEND=vllm) is the GPU engine"})
    vllm_port: int = field(default=0, metadata={"help": "vLLM's own port behind the proxy; 0 = a free one (port + 1 can be taken by a neighbour replica)"})
    vllm_args: str = field(default="", metadata={"help": "extra vLLM server arguments, space-separated"})

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if env is None else env
        s = cls()
        for f in dataclasses.fields(cls):
            raw = env.get(f"SERVE_{f.name.upper()}")
            if raw is not None:
                setattr(s, f.name, _cast(f.type, raw, f.name))
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, _cast(type(getattr(s, k)).__name__, v, k) if isinstance(v, str) else v)
        s.validate()
        return s

    def validate(self) -> None:
        if self.backend not in ("flask", "vllm"):
            raise ValueError(f"SERVE_BACKEND: {self.backend!r}; choose flask or vllm")
        for key in ("api_key", "admin_key"):
            v = getattr(self, key)
            if v and (len(v) < 8 or v.lower() in ("changeme", "change-me", "secret", "password")):
                raise ValueError(f"SERVE_{key.upper()}: refusing a short or placeholder key")
        if self.engine not in ("torch", "onnx"):
            raise ValueError(f"SERVE_ENGINE: {self.engine!r}; choose torch or onnx")
        if self.engine == "onnx" and self.backend != "flask":
            raise ValueError("SERVE_ENGINE=onnx runs on the flask backend (vLLM serves the PyTorch weights)")
        if self.lora_impl not in ("fused", "peft"):
            raise ValueError(f"SERVE_LORA_IMPL: {self.lora_impl!r}; choose fused or peft")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"SERVE_DTYPE: {self.dtype!r}; choose auto, float32, bfloat16 or float16")
        if self.engine == "onnx" and self.dtype != "auto":
            raise ValueError("SERVE_DTYPE: an ONNX export has its own precision (python -m export quantize)")
        if self.backend == "flask" and self.dtype == "float16":
            raise ValueError("SERVE_DTYPE=float16 is for vLLM on a GPU; on a CPU use bfloat16")
        if self.forward not in ("lean", "transformers"):
            raise ValueError(f"SERVE_FORWARD: {self.forward!r}; choose lean or transformers")
        if self.body_timeout <= 0 or self.drain_seconds < 0:
            raise ValueError("SERVE_BODY_TIMEOUT must be > 0 and SERVE_DRAIN_SECONDS >= 0")
        if self.finetune_worker not in ("auto", "on", "off", "k8s"):
            raise ValueError(f"SERVE_FINETUNE_WORKER: {self.finetune_worker!r}; choose auto, on, off, k8s")
        if self.max_upload_bytes < 1024 or self.upload_timeout <= 0:
            raise ValueError("SERVE_MAX_UPLOAD_BYTES must be >= 1024 and SERVE_UPLOAD_TIMEOUT > 0")
        if self.max_batch < 1 or self.max_body_bytes < 1024:
            raise ValueError("SERVE_MAX_BATCH must be >= 1 and SERVE_MAX_BODY_BYTES >= 1024")


def _cast(type_name, raw: str, name: str):
    t = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    try:
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
        if t == "bool":
            if raw.strip().lower() not in ("1", "true", "yes", "0", "false", "no", ""):
                raise ValueError
            return raw.strip().lower() in ("1", "true", "yes")
        if t == "Path":
            return Path(raw)
        return raw
    except ValueError:
        raise ValueError(f"SERVE_{name.upper()}: {raw!r} is not a valid {t}") from None
