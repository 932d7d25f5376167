"""Prometheus metrics (base units, `_total` counters), labelled by served model and adapter.

Shared by both backends: the Flask app records them itself; the vLLM backend's proxy records them
for requests it forwards, since vLLM's own metrics carry no per-adapter labels.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "tunestack"
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2)
_E2E = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        lab = ["model", "adapter"]
        self.requests = Counter(f"{PREFIX}_requests", "Requests finished, by model, adapter and HTTP status.",
                                [*lab, "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", lab, registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.", lab, registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from request to first token.",
                              lab, buckets=_TTFT, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Mean time per output token after the first.",
                              lab, buckets=_TPOT, registry=r)
        self.e2e = Histogram(f"{PREFIX}_request_duration_seconds", "End-to-end request latency.",
                             lab, buckets=_E2E, registry=r)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "Requests being served (HTTP level).", registry=r)
        self.http_active = Gauge(f"{PREFIX}_http_requests_active", "HTTP requests in progress on any route, this "
                                 "scrape excluded: what a drain on SIGTERM waits for.", registry=r)
        self.running = Gauge(f"{PREFIX}_requests_running", "Sequences in the running batch.", registry=r)
        self.queued = Gauge(f"{PREFIX}_requests_queued", "Sequences waiting for a batch slot.", registry=r)
        self.adapters_loaded = Gauge(f"{PREFIX}_adapters_loaded", "Adapters servable: checked and registered "
                                     "(the torch engine or vLLM loads their weights on first request).", registry=r)
        self.adapters_held = Gauge(f"{PREFIX}_adapters_held", "Adapters whose weights the torch engine holds "
                                   "(at most SERVE_MAX_LOADED_ADAPTERS), or that vLLM holds (SERVE_MAX_CPU_LORAS).", registry=r)
        self.adapter_loads = Counter(f"{PREFIX}_adapter_loads", "Adapter weights loaded into the engine.", registry=r)
        self.adapter_evictions = Counter(f"{PREFIX}_adapter_evictions", "Adapters evicted from the torch engine's "
                                         "cache or unloaded from vLLM (least recently used) to make room.", registry=r)
        self.adapter_load_seconds = Histogram(f"{PREFIX}_adapter_load_duration_seconds",
                                              "Adapter load time (read, check and install).",
                                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.adapter_load_failures = Counter(f"{PREFIX}_adapter_load_failures", "Adapters refused or failed to load.",
                                             ["adapter"], registry=r)
        self.proxy_overhead = Histogram(f"{PREFIX}_proxy_overhead_seconds", "Latency the metrics proxy adds.",
                                        buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01), registry=r)

    def record_request(self, labels: tuple[str, str], status: int, t0: float, usage: dict[str, int] | None = None,
                       first_token_at: float | None = None, choices: int = 1) -> None:
        """One finished request; token counts and latencies only for a 200 whose usage is known."""
        self.requests.labels(*labels, str(status)).inc()
        if status != 200 or not usage:
            return
        end = time.perf_counter()
        completion = usage.get("completion_tokens", 0)
        self.prompt_tokens.labels(*labels).inc(usage.get("prompt_tokens", 0))
        self.generation_tokens.labels(*labels).inc(completion)
        self.e2e.labels(*labels).observe(end - t0)
        if first_token_at is not None:
            self.ttft.labels(*labels).observe(first_token_at - t0)
            per_choice = completion / max(1, choices)  # n choices decode side by side: time per token of one
            if per_choice > 1:
                self.tpot.labels(*labels).observe((end - first_token_at) / (per_choice - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
