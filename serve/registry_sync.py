"""Keeps a server's adapters equal to the registry's: check each one, load it, unload removed ones.

With `on_demand` (the torch engine's adapter_cache.py, vLLM's serve/vllm/adapters.py), "load" registers
the checked adapter as servable and the engine reads its weights on first request: a start or a poll
reads no weights, and the engine reports a load that fails later (`load_failed`).

Publishing into the registry is an atomic rename, so a poll sees complete entries only. Every
adapter is checked before loading (checksums, base model identity, no pickled weights, LoRA rank
within the server's limit and target modules present in the base, by the manifest and by the
adapter_config.json the loader reads); a refused adapter is logged and reported by the admin API,
and the others keep serving. Used by both backends through the small `Loader` protocol.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from artifacts import MANIFEST_NAME, Manifest, ManifestError, Registry, RegistryError
from lm.adapters import lora_rank, mixed_batch_refusal

log = logging.getLogger("serve.registry_sync")


def evidence(m: Manifest) -> dict[str, Any]:
    """What a dashboard reads beside an adapter's name: extra /v1/models fields the OpenAI SDK ignores."""
    head, ret, gate = m.metrics.get("headline") or {}, m.metrics.get("retention") or {}, m.extra.get("gate") or {}
    return {"version": f"v{m.extra['version']}" if m.extra.get("version") else None,
            "task_metric": head.get("metric"), "task_gain": head.get("gain_points"),
            "retention": {k: ret.get(k) for k in ("base", "tuned", "drop_points", "kl")} if ret else None,
            "gate": {k: gate.get(k) for k in ("passed", "forced", "min_gain", "max_retention_drop")} if "passed" in gate else None}


class Loader(Protocol):
    def load_adapter(self, name: str, path: str) -> None: ...
    def unload_adapter(self, name: str) -> None: ...


class Refused(Exception):
    pass


@dataclass
class AdapterState:
    state: str  # loaded (servable; on_demand: registered) | refused | failed | disabled | unloading
    reason: str = ""
    version: str = ""  # manifest created_at + weights sha: a re-publish under the same name reloads
    method: str | None = None
    rank: int | None = None
    load_seconds: float | None = None
    updated_at: float = field(default_factory=time.time)
    evidence: dict[str, Any] | None = None  # registry version, task gain, retention, gate: shown by /v1/models

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # torch.load runs code: never loaded


class AdapterSync:
    """Loads and unloads adapters to follow the registry. Locking: `_lock` only guards the states
    table (short); one lock per name orders that name's loads and unloads, and is the only one held
    while the engine swaps weights, so the admin API and the other names never wait on the engine."""

    def __init__(self, registry: Registry, loader: Loader, base_sha256: str, base_modules: set[str],
                 max_lora_rank: int, metrics=None, poll_seconds: float = 0.5, on_demand: bool = False):
        """on_demand: the loader registers adapters and loads their weights on first request (it counts loads)."""
        self.registry = registry
        self.loader = loader
        self.base_sha256 = base_sha256
        self.base_modules = base_modules
        self.max_lora_rank = max_lora_rank
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.on_demand = on_demand
        self.states: dict[str, AdapterState] = {}  # replaced, never changed in place: readers iterate freely
        self._lock = threading.RLock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- checks ------------------------------------------------------------------
    def check(self, name: str) -> tuple[str, dict, dict[str, Any]]:
        """(path, manifest peft config, evidence) if the adapter may be served; raises Refused with the reason."""
        try:
            m = self.registry.verify("adapters", name)
        except (ManifestError, RegistryError) as e:
            raise Refused(str(e)) from None
        if m.base_model.get("sha256") != self.base_sha256:
            raise Refused(f"trained on base {m.base_model.get('name')} (sha256 {str(m.base_model.get('sha256'))[:12]}), "
                          f"this server runs sha256 {self.base_sha256[:12]}")
        path = self.registry.path("adapters", name)
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise Refused(f"{', '.join(pickles)}: pickled weights can run code when loaded; publish safetensors only")
        pc = m.peft_config or {}
        reason = mixed_batch_refusal(pc, self.max_lora_rank, self.base_modules) or self._disk_config_refusal(path)
        if reason:
            raise Refused(reason)
        return str(path), pc, evidence(m)

    def _disk_config_refusal(self, path: Path) -> str | None:
        """The loader reads adapter_config.json, not the manifest: it must pass the same checks."""
        try:
            disk = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return f"adapter_config.json is unreadable: {e}"
        if not isinstance(disk, dict):
            return "adapter_config.json is not a JSON object"
        reason = mixed_batch_refusal(disk, self.max_lora_rank, self.base_modules)
        return f"adapter_config.json: {reason}" if reason else None

    @staticmethod
    def _version(registry: Registry, name: str) -> str:
        """What a re-publish or a rollback changes: the version folder the name points at, and its manifest.

        One readlink and one stat per entry, no manifest read: a poll of 1,000 adapters (2,000
        entries with their pinned name@v1) must cost milliseconds, not seconds (bench/registry_poll.py).
        A publish writes a new folder (a new manifest inode) and a rollback repoints the name."""
        entry = os.path.join(registry.root, "adapters", name)  # a name from the listing; loading checks escapes
        target = os.readlink(entry) if os.path.islink(entry) else name
        st = os.stat(os.path.join(entry, MANIFEST_NAME))
        return f"{target}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"

    # -- the states table ------------------------------------------------------------
    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    def _set_state(self, name: str, st: AdapterState | None) -> None:
        with self._lock:
            states = dict(self.states)
            if st is None:
                states.pop(name, None)
            else:
                states[name] = st
            self.states = states
            self._update_gauge()

    # -- one pass ------------------------------------------------------------------
    def load(self, name: str, version: str | None = None) -> AdapterState:
        with self._name_lock(name):
            return self._load(name, version)

    def _load(self, name: str, version: str | None) -> AdapterState:
        t0 = time.perf_counter()
        try:
            version = version or self._version(self.registry, name)
            path, pc, ev = self.check(name)
            self.loader.load_adapter(name, path)
        except Refused as e:
            st = AdapterState("refused", str(e), version or "")
        except FileNotFoundError as e:  # unpublished (or rolled back and pruned) while it was being read
            st = AdapterState("failed", f"adapter files disappeared during the load: {e.filename}", version or "")
        except Exception as e:  # a loader failure (corrupt tensors, server refusal) refuses this adapter only
            st = AdapterState("failed", f"{type(e).__name__}: {e}".splitlines()[0], version or "")
        else:
            st = AdapterState("loaded", "", version, "lora", lora_rank(pc), round(time.perf_counter() - t0, 3),
                              evidence=ev)
            if self.metrics and not self.on_demand:
                self.metrics.adapter_loads.inc()
                self.metrics.adapter_load_seconds.observe(time.perf_counter() - t0)
        if st.state != "loaded":
            log.warning("adapter %s refused: %s", name, st.reason)
            if self.metrics:
                self.metrics.adapter_load_failures.labels(name).inc()
        else:
            log.info("adapter %s %s in %.2fs", name, "registered" if self.on_demand else "loaded", st.load_seconds)
        self._set_state(name, st)
        return st

    def load_failed(self, name: str, path: str, reason: str) -> None:
        """The loader could not load `name` from `path` on demand (a corrupt file the checks could not see):
        mark it failed with the reason and drop it from the loader. A re-publish gets a new chance."""
        with self._name_lock(name):
            st = self.states.get(name)
            try:
                current = str(self.registry.path("adapters", name))
            except (RegistryError, OSError):
                current = None
            if st is None or st.state != "loaded" or current != path:
                return  # re-published, unloaded or removed meanwhile
            self._set_state(name, AdapterState("failed", reason, st.version))
            if self.metrics:
                self.metrics.adapter_load_failures.labels(name).inc()
            self.loader.unload_adapter(name)

    def unload(self, name: str, state: str | None = None) -> None:
        with self._name_lock(name):
            st = self.states.get(name)
            if st and st.state == "loaded":
                # Not servable from here on (new requests get 404), then the engine lets its rows finish.
                self._set_state(name, AdapterState("unloading", "", st.version))
                try:
                    self.loader.unload_adapter(name)
                except Exception:
                    self._set_state(name, st)  # still held by the engine: still served
                    raise
                log.info("adapter %s unloaded", name)
            if state:
                self._set_state(name, AdapterState(state, "unloaded by admin", st.version if st else ""))
            else:
                self._set_state(name, None)

    def sync_once(self) -> None:
        present = set(self.registry.names("adapters"))  # names and pinned name@vN
        for name in sorted(present):
            try:
                version = self._version(self.registry, name)
            except (ManifestError, RegistryError, OSError):
                version = "unreadable"
            with self._name_lock(name):  # decided under the name's lock: an admin call may have just acted
                st = self.states.get(name)
                if st is None or (st.version != version and st.state != "disabled"):
                    self._load(name, version)
        for name in sorted(set(self.states) - present):
            self.unload(name)

    def evidence(self) -> dict[str, dict[str, Any]]:
        """Per loaded adapter: its registry version, task gain, retention and gate, from its manifest."""
        return {n: s.evidence for n, s in self.states.items() if s.state == "loaded" and s.evidence}

    def loaded(self) -> list[str]:
        return sorted(n for n, s in self.states.items() if s.state == "loaded")

    def is_loaded(self, name: str) -> bool:
        """Whether `name` is loaded and servable (one dict lookup: asked on every request)."""
        st = self.states.get(name)
        return st is not None and st.state == "loaded"

    def _update_gauge(self) -> None:
        if self.metrics:
            self.metrics.adapters_loaded.set(len(self.loaded()))

    # -- background ----------------------------------------------------------------
    def start(self) -> None:
        self.sync_once()
        self._thread = threading.Thread(target=self._loop, name="adapter-sync", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.sync_once()
            except Exception:
                log.exception("registry sync failed; retrying")

    def stop(self) -> None:
        self._stop.set()
