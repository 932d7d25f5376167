"""A tiny-model registry with two adapters and a real `python -m serve` over it, for the reliability tests."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from artifacts import Registry
from tests.serve.conftest import Server, start_server, train_adapter

API_KEY = "reliability-api-key-0001"
ADMIN_KEY = "reliability-admin-key-0002"
ENV = {"SERVE_API_KEY": API_KEY, "SERVE_ADMIN_KEY": ADMIN_KEY, "SERVE_THREADS": "2", "SERVE_MAX_MODEL_LEN": "256"}


def two_adapter_registry(tiny_model: Path, work: Path) -> Path:
    """The tiny random Llama as base, with two briefly trained adapters (chef-a, chef-b) published."""
    reg_dir = work / "registry"
    reg = Registry(reg_dir)
    for seed, name in ((1, "chef-a"), (2, "chef-b")):
        reg.publish_run(train_adapter(tiny_model, work / "runs", name, seed), name)
    return reg_dir


def start(registry: Path, **env: str) -> Server:
    """A ready server with both keys set (ENV), plus `env`."""
    return start_server(registry, {**ENV, **env})


def gauge(url: str, name: str) -> float:
    """One unlabelled gauge's value from the server's /metrics."""
    return gauges(url, name)[0]


def gauges(url: str, *names: str) -> list[float]:
    """Unlabelled gauges' values from one scrape of /metrics: a consistent snapshot, unlike separate scrapes."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = []
    for name in names:
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        values.append(float(m.group(1)))
    return values
