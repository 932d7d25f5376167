"""The adapter cache: which adapters an engine may serve, which it holds, and loading on first request.

    register(name, path)          servable, nothing read (any thread: the registry sync)
    request, adapter not held ──park──> read off the engine thread (LOAD_SLOTS at a time)
                               ──settle──> installed between two steps, evicting the least recently
                                           used adapter that no running or first-in-line request uses
                               ──> its parked requests go back first in line

The batch keeps stepping while an adapter is read: only the requests that name it wait. At most
`capacity` adapters are installed, plus LOAD_SLOTS read and waiting for room. A read that fails (a
corrupt file) fails the requests parked on it with the reason (503), and is reported once through
`on_failure` (the registry sync then marks the adapter failed: later requests get 404). An adapter
removed from the registry while requests wait for it fails them as not found (404, `Refusal.gone`).

Engine-agnostic: the engine passes `read` (any thread), `install(name, path, weights, victims)` (drops
the victims and installs in one step) and `evict` (engine thread only);
parked requests are opaque "waiters" handed back by `settle` and `forget`.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("serve.engine")
LOAD_SLOTS = 2  # adapters read at once (or read and waiting for room): bounds the memory beyond `capacity`


@dataclass
class _Read:
    name: str
    path: str
    weights: Any = None
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Refusal:
    """Why waiting requests fail: their adapter is `gone` from the registry (the model no longer exists:
    404), or it could not be loaded (the request was valid, the server could not serve it: 503)."""

    message: str
    gone: bool = False


@dataclass
class Settled:
    """What one `settle` decided: waiters to admit first, and waiters to fail with their refusal."""

    resumed: list = field(default_factory=list)
    failed: list[tuple[list, Refusal]] = field(default_factory=list)


class AdapterCache:
    def __init__(self, capacity: int, read: Callable[[str, str], Any], install: Callable[[str, str, Any, tuple], None],
                 evict: Callable[[str], None], metrics=None, slots: int = LOAD_SLOTS):
        if capacity < 1:
            raise ValueError("the adapter cache must hold at least one adapter")
        self.capacity, self.metrics, self.slots = capacity, metrics, slots
        self._read, self._install, self._evict = read, install, evict
        self.on_failure: Callable[[str, str, str], None] | None = None  # (name, path, reason), off the engine thread
        self.held: collections.OrderedDict[str, str] = collections.OrderedDict()  # name -> path, LRU first
        self.parked = 0  # requests waiting for their adapter (read by stats() on any thread)
        self._lock = threading.Lock()  # guards _registered and _failed, written by the sync and by reads
        self._registered: dict[str, str] = {}  # name -> path: servable
        self._failed: dict[str, str] = {}  # name -> why its registered path could not be loaded
        self._waiters: dict[str, list] = {}  # engine thread from here on
        self._queue: collections.deque[str] = collections.deque()  # names waiting for a load slot
        self._reading: set[str] = set()
        self._room: list[_Read] = []  # read, waiting for an adapter to evict
        self._done: queue.Queue[_Read] = queue.Queue()  # reads finished (pool threads -> engine thread)
        self._pool = ThreadPoolExecutor(slots, thread_name_prefix="adapter-load")

    # -- any thread -------------------------------------------------------------------
    def register(self, name: str, path: str) -> None:
        """Make `name` servable from `path` (a re-publish: a new path, a new chance after a failure)."""
        with self._lock:
            self._registered[name] = path
            self._failed.pop(name, None)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._registered.pop(name, None)

    def registered(self) -> dict[str, str]:
        with self._lock:
            return dict(self._registered)

    # -- engine thread ------------------------------------------------------------------
    def park(self, name: str, waiter) -> Refusal | None:
        """Queue `waiter` until `name` is held (None), or say why it cannot be served."""
        with self._lock:
            path, failed = self._registered.get(name), self._failed.get(name)
        if path is None:
            return gone(name)
        if failed is not None:
            return _refusal(name, failed)
        if name not in self._waiters and name not in self._reading and all(r.name != name for r in self._room):
            self._queue.append(name)
        self._waiters.setdefault(name, []).append(waiter)
        self.parked += 1
        return None

    def settle(self, in_use: set) -> Settled:
        """Between steps: take finished reads, install what fits, start the next reads. `in_use`: adapters
        of running and first-in-line requests, never evicted; they count as just used (LRU order)."""
        out = Settled()
        for name in in_use:
            if name in self.held:
                self.held.move_to_end(name)
        while True:
            try:
                self._take(self._done.get_nowait(), out)
            except queue.Empty:
                break
        keep = set(in_use)
        for r in list(self._room):
            victims = self._victims(r.name, keep)
            if victims is not None:
                self._room.remove(r)
                self._put(r, victims, out)
                keep.add(r.name)  # installed now: not the next one's victim
        self._start_reads()
        return out

    def forget(self, name: str) -> tuple[list, Refusal]:
        """`name` is no longer served: drop its weights; (its parked waiters, the refusal to fail them with)."""
        with self._lock:
            failed = self._failed.pop(name, None)
        if name in self.held:
            self._evict(name)
            del self.held[name]
            self._gauge()
        waiters = self._pop_waiters(name)
        return waiters, _refusal(name, failed) if failed else gone(name)

    def replace(self, name: str, path: str, weights) -> None:
        """A re-publish of a held adapter: its new weights in one step (the engine waits for its rows)."""
        if name in self.held:
            self._install(name, path, weights, ())
            self.held[name] = path
            if self.metrics:
                self.metrics.adapter_loads.inc()

    def close(self) -> list:
        """The engine stops: every parked waiter, to fail; no read is started again."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        waiters = [w for ws in self._waiters.values() for w in ws]
        self._waiters, self._queue, self.parked = {}, collections.deque(), 0
        return waiters

    # -- internals --------------------------------------------------------------------------
    def _take(self, r: _Read, out: Settled) -> None:
        self._reading.discard(r.name)
        with self._lock:
            path, failed = self._registered.get(r.name), self._failed.get(r.name)
        if path != r.path:  # re-published or removed while it was read
            if path is not None and self._waiters.get(r.name):
                self._queue.append(r.name)  # read the new version
            elif path is None and r.name in self._waiters:
                out.failed.append((self._pop_waiters(r.name), gone(r.name)))
            return
        if failed is not None:
            out.failed.append((self._pop_waiters(r.name), _refusal(r.name, failed)))
            return
        self._room.append(r)

    def _victims(self, name: str, keep: set) -> tuple[str, ...] | None:
        """The adapters to evict so that `name` fits: none, the least recently used one not in use, or
        None when every held adapter is in use (wait for a row to finish)."""
        if name in self.held or len(self.held) < self.capacity:
            return ()
        victim = next((n for n in self.held if n not in keep), None)
        return None if victim is None else (victim,)

    def _put(self, r: _Read, victims: tuple[str, ...], out: Settled) -> None:
        t0 = time.perf_counter()
        try:
            self._install(r.name, r.path, r.weights, victims)  # one step: the engine rebuilds its LoRA state once
        except Exception as e:  # noqa: BLE001 - this adapter's fault: its requests fail, the batch goes on
            for victim in victims:  # dropped before the install failed: no longer held either way
                del self.held[victim]
            log.exception("adapter %s install failed", r.name)
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            self._failure(r.name, r.path, reason)
            out.failed.append((self._pop_waiters(r.name), _refusal(r.name, reason)))
            self._gauge()
            return
        for victim in victims:
            del self.held[victim]
            log.info("adapter %s evicted (least recently used)", victim)
        if self.metrics and victims:
            self.metrics.adapter_evictions.inc(len(victims))
        self.held[r.name] = r.path
        seconds = r.seconds + time.perf_counter() - t0
        if self.metrics:
            self.metrics.adapter_loads.inc()
            self.metrics.adapter_load_seconds.observe(seconds)
        self._gauge()
        log.info("adapter %s loaded in %.2fs (%d held)", r.name, seconds, len(self.held))
        out.resumed += self._pop_waiters(r.name)

    def _start_reads(self) -> None:
        while self._queue and len(self._reading) + len(self._room) < self.slots:
            name = self._queue.popleft()
            with self._lock:
                path = self._registered.get(name)
            busy = name in self._reading or name in self.held or any(r.name == name for r in self._room)
            if path is None or name not in self._waiters or busy:
                continue  # removed meanwhile (its waiters were failed), or queued twice
            self._reading.add(name)
            self._pool.submit(self._read_job, name, path)

    def _read_job(self, name: str, path: str) -> None:
        """Pool thread: read and check the weights; a failure is recorded before the engine thread sees it."""
        t0 = time.perf_counter()
        r = _Read(name, path)
        try:
            r.weights = self._read(name, path)
        except FileNotFoundError as e:
            r.error = f"adapter files disappeared: {e.filename}"
        except Exception as e:  # noqa: BLE001 - a corrupt file: this adapter's requests fail with the reason
            r.error = f"{type(e).__name__}: {e}".splitlines()[0]
        r.seconds = time.perf_counter() - t0
        if r.error:
            self._failure(name, path, r.error)
        self._done.put(r)

    def _failure(self, name: str, path: str, reason: str) -> None:
        with self._lock:
            if self._registered.get(name) != path:
                return  # an old version's failure: the new one gets its own chance
            self._failed[name] = reason
        log.warning("adapter %s could not be loaded: %s", name, reason)
        if self.on_failure is not None:
            self._pool.submit(self._report, name, path, reason)  # never on the engine thread: it takes sync locks

    def _report(self, name: str, path: str, reason: str) -> None:
        try:
            self.on_failure(name, path, reason)
        except Exception:  # noqa: BLE001 - the requests already failed with the reason; only the report is lost
            log.exception("reporting adapter %s's failure failed", name)

    def _pop_waiters(self, name: str) -> list:
        waiters = self._waiters.pop(name, [])
        self.parked -= len(waiters)
        return waiters

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.adapters_held.set(len(self.held))


def _refusal(name: str, reason: str) -> Refusal:
    return Refusal(f"adapter {name!r} could not be loaded: {reason}")


def gone(name: str) -> Refusal:
    """`name` is not (or no longer) in the registry: the words of a request for an unknown model."""
    return Refusal(f"The model '{name}' does not exist (adapter '{name}' is not in the registry)", gone=True)
