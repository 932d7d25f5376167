"""Server settings: one typed object read from the environment (SERVE_<FIELD>, one variable per field), overridable by
CLI flags (--<field>); every field carries its reason (`opt`), printed by --help.

Compose and Kubernetes set these without code changes. Unsafe values are refused at start.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from lm.options import opt


@dataclass
class Settings:
    registry: Path = opt(Path("registry"), "model registry to serve (base + adapters); ./registry is where training publishes by default")
    backend: str = opt("flask", "flask (CPU/edge, PyTorch engine) or vllm (GPU production); flask runs anywhere, with no extra install")
    host: str = opt("127.0.0.1", "bind address; 0.0.0.0 in containers")
    port: int = opt(8000, "HTTP port; 8000 as vLLM and most OpenAI-compatible servers, so clients need no change")
    api_key: str = opt("", "Bearer key with the inference and finetune scopes; empty (and no keys file) = /v1 open (local use only)")
    admin_key: str = opt("", "Bearer key with every scope (inference, finetune, admin: publish, rollback, /admin/*); empty = admin API off")
    keys_file: str = opt("", "YAML/JSON list of {name, sha256 of the key, scopes} (serve/http/keys.py); empty = only the two keys above")
    max_body_bytes: int = opt(1 << 20, "larger bodies get 413; 1 MiB fits any chat")
    max_upload_bytes: int = opt(512 << 20, "POST /v1/files: larger training files get 413; 512 MiB is ~100k long chat rows")
    max_header_bytes: int = opt(8190, "a request header field longer than this gets 431 (gunicorn's limit_request_field_size; 100 fields at most); 8 KiB as gunicorn and nginx, far above a key or a trace header")
    finetune_worker: str = opt("auto", "fine-tuning jobs: auto = run `python -m train worker` beside the server when the training stack is installed (one box); on = that, or exit 2; off = jobs wait for an external worker (compose's trainer service); k8s = each job becomes a batch/v1 Job")
    finetune_dir: str = opt("", "where uploaded files and jobs live; empty = <registry>/.finetune (set it where the registry is mounted read-only)")
    finetune_job_template: Path = opt(Path("/etc/tunestack/train-job.yaml"), "SERVE_FINETUNE_WORKER=k8s: the training Job template (k8s/base/train-job.yaml, mounted from a ConfigMap)")
    finetune_namespace: str = opt("tunestack", "SERVE_FINETUNE_WORKER=k8s: the namespace Jobs are created in (the serving pod's own)")
    finetune_worker_args: str = opt("", "overrides for every job the local worker runs, space-separated section.field=value (e.g. eval sizes)")
    upload_timeout: float = opt(600.0, "seconds a training-file upload may take to arrive (512 MiB at ~1 MB/s)")
    max_batch: int = opt(32, "sequences decoded together (the Flask engine's batch; vLLM's --max-num-seqs); CPU throughput peaks near 32, GPU overlays raise it")
    max_model_len: int = opt(2048, "prompt + max_tokens limit (capped by the model); 2048 keeps a CPU KV cache small")
    max_lora_rank: int = opt(64, "larger adapters are refused (vLLM needs it at start); 64 covers the usual ranks 8-64")
    max_loaded_adapters: int = opt(32, "torch engine: adapters whose weights are held, least recently used evicted, others loaded on first request; 32 = a full batch of distinct adapters, ~1.2 GB of r=16 SmolLM2-135M adapters")
    max_loras: int = opt(8, "vLLM: adapters resident on the GPU at once; 8 batch together without crowding the KV cache")
    max_cpu_loras: int = opt(32, "vLLM: adapters it holds (host memory), others loaded on first request; LoRA weights are small (tens of MB), so 4x the GPU set")
    poll_seconds: float = opt(0.5, "registry poll period; publish -> servable in < 2 s")
    engine: str = opt("torch", "Flask backend engine: torch (base + LoRA adapters) or onnx (an exported model)")
    model: str = opt("", "engine=onnx: registry models/<name> to serve; empty = the only ONNX model there")
    lora_impl: str = opt("fused", "Flask engine LoRA path: fused (fast; tested equal to peft) or peft (reference)")
    dtype: str = opt("auto", "weights: auto (fp32 on CPU, the model's own on GPU vLLM), float32, bfloat16 (CPUs with AVX512-BF16/AMX), float16 (GPU vLLM)")
    forward: str = opt("lean", "torch engine forward: lean (fused, prepacked; Llama-family, else falls back) or transformers")
    threads: int = opt(0, "torch CPU threads; 0 = all cores (one server per machine)")
    malloc_arenas: int = opt(2, "glibc malloc arenas (M_ARENA_MAX) the server's threads share; 2 ends 100 MB lower with RSS growth after warm-up 6.5 -> 3.3-4.4 percent under sustained load, same throughput (bench/soak.py); 0 = glibc's default (8 per core)")
    http_threads: int = opt(64, "concurrent HTTP connections (gunicorn gthread); 64 covers streaming clients waiting on a batch of 32")
    body_timeout: float = opt(30.0, "seconds a request body may take to arrive; a client that trickles or stalls gets 408 and frees its thread (a 64 KiB chat arrives in ms)")
    drain_seconds: float = opt(25.0, "after SIGTERM, seconds in-flight requests get to finish while new ones get 503; fits k8s terminationGracePeriodSeconds 60 = preStop sleep 10 + drain 25 + worker stop 5 + vLLM child stop <= 20")
    cpu_on_gpu_host: bool = opt(False, "let the torch engine serve on the CPU of a machine with a GPU; refused by default, as vLLM (SERVE_BACKEND=vllm) is the GPU engine")
    vllm_port: int = opt(0, "vLLM's own port behind the proxy; 0 = a free one (port + 1 can be taken by a neighbour replica)")
    vllm_wedged_seconds: float = opt(60.0, "vLLM failing its /health makes /ready 503; failing it this long, it is killed and the server exits 1 to be restarted (a live vLLM answers in ms; 60 s outlasts a stall under load)")
    vllm_args: str = opt("", "extra vLLM server arguments, space-separated, last on its command line; empty: the settings above say everything")

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
        if self.max_loaded_adapters < 1:
            raise ValueError("SERVE_MAX_LOADED_ADAPTERS must be >= 1")
        if self.vllm_wedged_seconds <= 0 or self.max_header_bytes < 1024:
            raise ValueError("SERVE_VLLM_WEDGED_SECONDS must be > 0 and SERVE_MAX_HEADER_BYTES >= 1024")
        if self.malloc_arenas < 0:
            raise ValueError("SERVE_MALLOC_ARENAS must be >= 0 (0 = glibc's default)")
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
