"""The launch plan: what vLLM starts with (base, adapters, max LoRA rank, port), read from the registry once,
and the loader that keeps a running vLLM's adapters in sync with the registry (its runtime LoRA API)."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import httpx

from artifacts import Registry
from lm.adapters import vllm_max_lora_rank
from lm.loading import module_names_from_config
from serve.metrics import Metrics
from serve.registry_sync import AdapterState, AdapterSync, Refused
from serve.served_model import ConfigurationError, registry_base
from serve.settings import Settings

log = logging.getLogger("serve.vllm")


class VLLMLoader:
    """AdapterSync's loader for a running vLLM: its runtime LoRA API."""

    def __init__(self, base_url: str):
        self.http = httpx.Client(base_url=base_url, timeout=120)

    def load_adapter(self, name: str, path: str) -> None:
        self.unload_adapter(name, missing_ok=True)  # a re-publish under the same name replaces it
        r = self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if r.status_code != 200:
            raise RuntimeError(f"vLLM refused {name}: {r.text[:300]}")

    def unload_adapter(self, name: str, missing_ok: bool = False) -> None:
        r = self.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code != 200 and not missing_ok:
            raise RuntimeError(f"vLLM could not unload {name}: {r.text[:300]}")


@dataclass
class LaunchPlan:
    """What vLLM is started with, and what the proxy needs to reach it and keep its adapters in sync."""

    registry: Registry
    name: str  # the served base model name
    path: str  # the base model's weights
    sha256: str
    base_modules: set[str]
    max_lora_rank: int
    startup: dict[str, str]  # adapters passed as --lora-modules, name -> path
    port: int
    launched: dict[str, AdapterState]  # their states once vLLM is up (checked once, here)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def adapter_sync(self, max_lora_rank: int, metrics: Metrics, poll_seconds: float) -> AdapterSync:
        return AdapterSync(self.registry, VLLMLoader(self.url), self.sha256, self.base_modules, max_lora_rank,
                           metrics, poll_seconds)


def plan_launch(settings: Settings, metrics: Metrics) -> LaunchPlan:
    """Read the registry: the base model, the adapters vLLM starts with (each checked once) and the
    max LoRA rank they need (rounded up to a rank vLLM allows).

    A bad base refuses the whole start-up (ConfigurationError: `python -m serve` exits 2 with one
    line). A bad adapter refuses that adapter only: it is left out of the launch, and the registry
    watcher's first pass records it as refused with its reason (logs, /admin/adapters)."""
    reg, name, path, sha = registry_base(settings)
    try:
        modules = module_names_from_config(path)
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"base model {name} at {path}: unreadable config ({str(e).splitlines()[0]})") from None
    plan = LaunchPlan(reg, name, path, sha, modules, settings.max_lora_rank, {},
                      settings.vllm_port or _free_port(), {})
    probe = plan.adapter_sync(settings.max_lora_rank, metrics, settings.poll_seconds)
    for n in reg.names("adapters"):  # every name and pinned name@vN
        try:
            plan.startup[n], plan.launched[n] = probe.checked_state(n)
        except (Refused, ValueError, OSError) as e:  # ManifestError, RegistryError: this adapter only
            log.warning("adapter %s refused at launch: %s", n, str(e).splitlines()[0] if str(e) else type(e).__name__)
    need = max((st.rank for st in plan.launched.values()), default=settings.max_lora_rank)
    plan.max_lora_rank = vllm_max_lora_rank(need) or 512
    return plan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
