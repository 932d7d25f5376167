"""vLLM's own /health, asked by the monitor: a vLLM whose process lives but does not answer is wedged.

    answers 200 ──> ready
    fails FAILURES checks in a row ──> unready (/ready 503 "vllm_unhealthy"; requests still go through)
    answers again ──> ready again
    fails for `wedged_seconds` ──> wedged: the monitor kills it, a death (the server exits 1, restarted)
"""

from __future__ import annotations

import time

import httpx

PERIOD_S = 2.0  # between checks: a wedge turns /ready 503 within FAILURES x (PERIOD_S + TIMEOUT_S), ~14 s
TIMEOUT_S = 5.0  # a live vLLM answers /health in milliseconds: its API server is not the engine core's busy loop
FAILURES = 2  # in a row before unready: one slow answer while the CPU is saturated is not a wedge


class HealthWatch:
    """When due, asks vLLM's /health and says whether the server should be unready, and why."""

    def __init__(self, url: str, wedged_seconds: float, clock=time.monotonic):
        self.url, self.wedged_seconds, self.clock = f"{url}/health", wedged_seconds, clock
        self.http = httpx.Client(timeout=TIMEOUT_S)
        self.failures = 0
        self.failing_since: float | None = None
        self.next_at = clock()

    def due(self) -> bool:
        return self.clock() >= self.next_at

    def check(self) -> str | None:
        """Ask /health once: None when the server may be ready, else the reason it is not."""
        try:
            status = self.http.get(self.url).status_code
            problem = None if status == 200 else f"vLLM's /health answered {status}"
        except httpx.HTTPError as e:
            problem = f"vLLM's /health did not answer ({type(e).__name__})"
        now = self.clock()
        self.next_at = now + PERIOD_S
        if problem is None:
            self.failures, self.failing_since = 0, None
            return None
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = now
        return problem if self.failures >= FAILURES else None

    def wedged(self) -> bool:
        """Failing for `wedged_seconds` or more: no longer worth waiting for."""
        return self.failing_since is not None and self.clock() - self.failing_since >= self.wedged_seconds
