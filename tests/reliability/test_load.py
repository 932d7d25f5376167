"""Load: concurrent clients for a while, mixed adapters, streaming and not, on the Flask backend.

0 failed requests, resident memory growth under 10 % from the first window to the last, the server
healthy and idle (in-flight 0) afterwards; p50/p99 latency and tokens/s are printed for the docs.
CI size: 64 clients for 20 s (5 s windows). `pytest --full`: 64 clients for 60 s (10 s windows).
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import FULL  # --full (pytest_configure sets it before this import)
from tests.reliability.loadgen import LoadConfig, run_load
from tests.reliability.servers import API_KEY, gauge

pytestmark = pytest.mark.slow


def test_mixed_load_has_no_failures_and_no_memory_growth(served):
    models = ["chef-a", "chef-b", _base_name(served.url)]
    warm = run_load(LoadConfig(served.url, models, API_KEY, clients=64, seconds=3))  # allocator and caches settle
    assert warm.failed == 0, warm.errors
    cfg = LoadConfig(served.url, models, API_KEY, clients=64, seconds=60 if FULL else 20, window=10 if FULL else 5,
                     pid=served.proc.pid)
    rep = run_load(cfg)
    print(f"\nload ({'full' if FULL else 'CI'} size, {cfg.clients} clients, {cfg.seconds:.0f} s): {rep.line()}")
    assert rep.failed == 0, rep.errors
    assert rep.requests >= cfg.clients and rep.streamed > 0 and rep.requests - rep.streamed > 0
    assert set(rep.per_model) == set(models), rep.per_model
    assert rep.rss_growth is not None and rep.rss_growth < 0.10, rep.line()
    assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200
    deadline = time.time() + 30
    while gauge(served.url, "tunestack_requests_in_flight") != 0 and time.time() < deadline:
        time.sleep(0.2)
    assert gauge(served.url, "tunestack_requests_in_flight") == 0


def _base_name(url: str) -> str:
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).json()["data"]
    return next(m["id"] for m in models if not m.get("parent"))
