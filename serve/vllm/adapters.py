"""The vLLM backend's adapter cache: vLLM is asked to hold at most `capacity` adapters, each loaded on its
first request and the least recently used one unloaded to make room.

    registry sync ──register(name, path)──> servable; vLLM is not asked (start-up and polls read no weights)
    request for an adapter vLLM holds ──> forwarded at once (pinned until its answer ends)
    request for one it does not ──> waits for the one load at a time: the least recently used adapter no
                                    request uses is unloaded, then /v1/load_lora_adapter; then forwarded

Why: vLLM 0.32's /v1/load_lora_adapter (and --lora-modules) reads the weights at once into its worker's
LRU cache of --max-cpu-loras, evicting the oldest; a request naming an evicted adapter is read again
from disk inside the engine loop, stalling every running request; /v1/unload_lora_adapter only forgets
the name (the weights stay cached until evicted). Keeping at most --max-cpu-loras names registered keeps
the weights of every name vLLM knows in that cache, and a start with 1,000 registered adapters reads none.
A pinned adapter is never unloaded: a request must not reach vLLM after its name was forgotten.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import httpx

from serve.errors import APIError

log = logging.getLogger("serve.vllm")
LOAD_TIMEOUT = 120.0  # s for vLLM to read an adapter: a large one from a slow volume, on a busy engine


class VLLMAdapters:
    """AdapterSync's Loader for vLLM (on demand) and the proxy's acquire/release around each request."""

    def __init__(self, base_url: str, capacity: int, metrics=None, wait_s: float = 600.0):
        if capacity < 1:
            raise ValueError("vLLM must hold at least one adapter")
        self.capacity, self.metrics, self.wait_s = capacity, metrics, wait_s
        self.http = httpx.Client(base_url=base_url, timeout=LOAD_TIMEOUT)
        self.on_failure: Callable[[str, str, str], None] | None = None  # (name, path, reason): the sync marks it failed
        self.held: collections.OrderedDict[str, str] = collections.OrderedDict()  # in vLLM: name -> path, LRU first
        self._registered: dict[str, str] = {}  # servable: name -> path
        self._pins: collections.Counter[str] = collections.Counter()  # requests forwarded, not yet ended
        self._table = threading.Condition()  # guards the three above; notified when a pin is released
        self._changes = threading.Lock()  # one load or unload in vLLM at a time (its engine adds them one by one)

    # -- the registry sync (Loader) ------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Register `name` as servable from `path`; a re-publish drops the old version vLLM holds."""
        with self._table:
            self._registered[name] = path
            stale = self.held.get(name) not in (None, path)
        if stale:
            self._drop(name)

    def unload_adapter(self, name: str) -> None:
        with self._table:
            self._registered.pop(name, None)
        self._drop(name)

    # -- the proxy ---------------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """Make sure vLLM holds `name` and pin it until `release`. 404 when it is no longer registered,
        503 when vLLM refuses the load (reported to the sync) or no adapter can make room in time."""
        if self._pin_if_held(name):
            return
        with self._changes:
            if self._pin_if_held(name):  # loaded while this request waited for the previous load
                return
            with self._table:
                path = self._registered.get(name)
                if path is None:
                    raise APIError(404, f"The model '{name}' does not exist (adapter '{name}' is not in the registry)",
                                   "model", "model_not_found")
                victim = self._room()
            if victim is not None:
                self._unload(victim)
                if self.metrics:
                    self.metrics.adapter_evictions.inc()
                log.info("adapter %s unloaded from vLLM (least recently used)", victim)
            reason = self._load(name, path)
            if reason is None:
                return
        log.warning("adapter %s could not be loaded: %s", name, reason)
        if self.on_failure is not None:  # outside _changes: the sync's report unloads, which takes it
            self.on_failure(name, path, reason)
        raise APIError(503, f"adapter {name!r} could not be loaded: {reason}", code="engine_error")

    def release(self, name: str) -> None:
        with self._table:
            self._pins[name] -= 1
            if self._pins[name] <= 0:
                del self._pins[name]
            self._table.notify_all()

    # -- internals ---------------------------------------------------------------------------
    def _pin_if_held(self, name: str) -> bool:
        with self._table:
            if name not in self.held:
                return False
            self.held.move_to_end(name)
            self._pins[name] += 1
            return True

    def _room(self) -> str | None:
        """(Under _table) the adapter to unload so one more fits: none, or the least recently used one no
        request uses, waiting for a request to end while every held adapter is in use."""
        if len(self.held) < self.capacity:
            return None
        ready = self._table.wait_for(lambda: any(n not in self._pins for n in self.held), self.wait_s)
        if not ready:
            raise APIError(503, f"all {self.capacity} adapters vLLM holds (SERVE_MAX_CPU_LORAS) stayed in use for "
                           f"{self.wait_s:g} s", code="adapters_busy")
        victim = next(n for n in self.held if n not in self._pins)
        del self.held[victim]
        self._gauge()
        return victim

    def _load(self, name: str, path: str) -> str | None:
        """Load `name` into vLLM and pin it; the reason when vLLM refuses it (the adapter's fault)."""
        t0 = time.perf_counter()
        try:
            r = self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        except httpx.HTTPError as e:  # vLLM's fault, not the adapter's: nothing is reported
            raise APIError(503, f"vLLM is unavailable: {e}", code="upstream_unavailable") from None
        if r.status_code != 200:
            return f"vLLM refused it ({r.status_code}): {r.text[:300]}"
        seconds = time.perf_counter() - t0
        with self._table:
            self.held[name] = path
            self._pins[name] += 1
            self._gauge()
        if self.metrics:
            self.metrics.adapter_loads.inc()
            self.metrics.adapter_load_seconds.observe(seconds)
        log.info("adapter %s loaded into vLLM in %.2fs (%d held)", name, seconds, len(self.held))
        return None

    def _drop(self, name: str) -> None:
        """vLLM forgets `name` (removed or re-published); requests already in vLLM finish on their version."""
        with self._changes:
            with self._table:
                if self.held.pop(name, None) is None:
                    return
                self._gauge()
            self._unload(name)

    def _unload(self, name: str) -> None:
        try:
            r = self.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
            if r.status_code not in (200, 404):  # 404: vLLM does not know it (restarted meanwhile)
                log.warning("vLLM could not unload adapter %s: %s", name, r.text[:300])
        except httpx.HTTPError as e:
            log.warning("vLLM could not unload adapter %s: %s", name, e)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.adapters_held.set(len(self.held))
