"""The launch plan: what vLLM starts with (base, max LoRA rank, port), read from the registry once.

vLLM starts with no adapter: the registry sync registers each one with the adapter cache (adapters.py),
which loads it into vLLM on its first request."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from artifacts import Registry
from lm.adapters import lora_rank, vllm_max_lora_rank
from lm.loading import module_names_from_config
from serve.metrics import Metrics
from serve.registry_sync import AdapterSync, Loader, Refused
from serve.served_model import ConfigurationError, registry_base
from serve.settings import Settings

log = logging.getLogger("serve.vllm")


@dataclass
class LaunchPlan:
    """What vLLM is started with, and what the proxy needs to reach it and follow the registry."""

    registry: Registry
    name: str  # the served base model name
    path: str  # the base model's weights
    sha256: str
    base_modules: set[str]
    max_lora_rank: int
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def adapter_sync(self, loader: Loader | None, max_lora_rank: int, metrics: Metrics,
                     poll_seconds: float) -> AdapterSync:
        """The registry sync: it registers adapters with `loader`, which loads them on first request."""
        return AdapterSync(self.registry, loader, self.sha256, self.base_modules, max_lora_rank,
                           metrics, poll_seconds, on_demand=True)


def plan_launch(settings: Settings, metrics: Metrics) -> LaunchPlan:
    """Read the registry: the base model and the max LoRA rank its adapters need (each checked; rounded up
    to a rank vLLM allows).

    A bad base refuses the whole start-up (ConfigurationError: `python -m serve` exits 2 with one
    line). A bad adapter refuses that adapter only: its rank does not count, and the registry
    watcher's first pass records it as refused with its reason (logs, /admin/adapters)."""
    reg, name, path, sha = registry_base(settings)
    try:
        modules = module_names_from_config(path)
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"base model {name} at {path}: unreadable config ({str(e).splitlines()[0]})") from None
    plan = LaunchPlan(reg, name, path, sha, modules, settings.max_lora_rank, settings.vllm_port or _free_port())
    probe = plan.adapter_sync(None, settings.max_lora_rank, metrics, settings.poll_seconds)  # checks only
    ranks = []
    for n in reg.names("adapters"):  # every name and pinned name@vN
        try:
            ranks.append(lora_rank(probe.check(n)[1]))
        except (Refused, ValueError, OSError) as e:  # ManifestError, RegistryError: this adapter only
            log.warning("adapter %s refused at launch: %s", n, str(e).splitlines()[0] if str(e) else type(e).__name__)
    need = max((r for r in ranks if r), default=settings.max_lora_rank)
    plan.max_lora_rank = vllm_max_lora_rank(need) or 512
    return plan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
