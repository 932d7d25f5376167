"""Adapter faults at registry scale on the Flask backend (issue 28, item 5), on the tiny model: 100 adapters
published, a cache of 4, one corrupt adapter among them, one removed while requests wait for it, a burst
over 50 adapters not loaded yet.

The server is the real wiring (create_flask_app: registry -> TorchEngine with its adapter cache -> AdapterSync
on demand -> app) behind werkzeug's threaded server in this process, so the test can hold an adapter's read
at a gate. The watcher's period is long: each test runs its registry pass itself (`sync.sync_once()`).
The adapters are four random r=4 LoRAs (test_registry_faults.make_run) each published under 25 names: the
registry hard-links the files, so a fault is written as a new file, never through the shared one.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from artifacts import Registry
from tests.reliability.test_registry_faults import make_run

N_ADAPTERS = 100
SEEDS = 4  # distinct weights, spread over the names: a mixed-up adapter answers with another seed's text
CACHE = 4  # SERVE_MAX_LOADED_ADAPTERS: far fewer than the adapters a burst asks for, so eviction happens
PROMPT = "The menu"
WAIT_S = 60  # a bound on waiting for the engine and the server, never a timing assertion


def name_of(i: int) -> str:
    return f"a{i:03d}"


@dataclass
class Served:
    url: str
    registry: Registry
    app: object  # the Flask app; its state holds the engine and the sync

    @property
    def engine(self):
        return self.app.extensions["tunestack"].backend.engine

    @property
    def sync(self):
        return self.app.extensions["tunestack"].sync


def _replace(path: Path, data: bytes) -> None:
    """A fault written as a new file: the old one is a hard link shared with the run and the other names."""
    path.unlink()
    path.write_bytes(data)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    from werkzeug.serving import make_server

    from serve.flask_backend.server import create_flask_app
    from serve.settings import Settings

    work = tmp_path_factory.mktemp("adapter-faults")
    reg = Registry(work / "registry")
    runs = [make_run(tiny_model, work / "runs" / f"seed{s}", s + 1) for s in range(SEEDS)]
    for i in range(N_ADAPTERS):
        reg.publish_run(runs[i % SEEDS], name_of(i))
    for extra in ("corrupt", "truncated", "doomed", "doomed-queued", "slow"):
        reg.publish_run(runs[0], extra)
    weights = reg.path("adapters", "corrupt") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight byte: the header still parses, the checksum does not match
    _replace(weights, bytes(data))
    settings = Settings(registry=reg.root, max_loaded_adapters=CACHE, max_lora_rank=16, max_batch=8,
                        max_model_len=256, poll_seconds=3600)
    app = create_flask_app(settings)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=http.serve_forever, name="test-http", daemon=True).start()
    s = Served(f"http://127.0.0.1:{http.port}", reg, app)
    deadline = time.monotonic() + WAIT_S
    while httpx.get(f"{s.url}/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.1)
    yield s
    http.shutdown()
    s.sync.stop()
    s.engine.shutdown()


def complete(url: str, model: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=WAIT_S,
                      json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})


def text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def states(served: Served) -> dict:
    return {n: s.state for n, s in served.sync.states.items()}


@pytest.fixture(scope="module")
def reference(served) -> dict[int, str]:
    """Each seed's greedy answer, one request at a time (the first SEEDS names)."""
    ref = {s: text(complete(served.url, name_of(s))) for s in range(SEEDS)}
    assert len(set(ref.values())) == SEEDS, f"precondition: the seeds answer differently: {ref}"
    return ref


def _wait(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.01)


def test_the_server_starts_with_every_adapter_registered_and_none_read(served):
    st = states(served)
    assert sum(v == "loaded" for v in st.values()) == 2 * (N_ADAPTERS + 4), "each name and its name@v1"
    assert not served.engine.adapters, "start-up reads no adapter weights"


@pytest.mark.slow  # ~15-30 s on 2 cores: 50-100 adapter loads through a cache of 4
def test_a_corrupt_adapter_among_many_is_refused_clearly_and_the_others_serve(served, reference):
    """Corrupt at publish: refused by its checksum at registration (the admin API names the file), a request
    for it is a 404 naming it. Truncated after registration: its first request is a 503 naming it and the
    reason, then it is marked failed. The 100 others serve their own weights throughout."""
    reason = served.sync.states["corrupt"].reason
    assert states(served)["corrupt"] == "refused" and "adapter_model.safetensors" in reason, reason
    r = complete(served.url, "corrupt")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert "'corrupt'" in r.json()["error"]["message"]

    weights = served.registry.path("adapters", "truncated") / "adapter_model.safetensors"
    _replace(weights, weights.read_bytes()[:-64])
    r = complete(served.url, "truncated")
    err = r.json()["error"]
    assert r.status_code == 503 and err["code"] == "engine_error", r.text
    assert err["message"].startswith("adapter 'truncated' could not be loaded: "), err
    _wait(lambda: states(served)["truncated"] == "failed", "the load failure marked on the registry sync")
    assert complete(served.url, "truncated").status_code == 404

    names = [name_of(i) for i in range(N_ADAPTERS)]
    with cf.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda n: complete(served.url, n), names))
    assert [r.status_code for r in got] == [200] * N_ADAPTERS, [r.text for r in got if r.status_code != 200][:2]
    assert [text(r) for r in got] == [reference[i % SEEDS] for i in range(N_ADAPTERS)]


def test_an_adapter_removed_while_requests_wait_for_it_ends_them_with_404(served, reference):
    """Both load slots held at a gate ('doomed' and 'slow' being read), so 'doomed-queued' waits for a slot:
    requests waiting for a read and for a slot. Both names are unpublished and the registry pass runs: their
    requests end with 404 model_not_found (not 503, not a hang); 'slow' then loads and serves."""
    engine = served.engine
    gate, read = threading.Event(), engine.cache._read
    engine.cache._read = lambda name, path: (gate.wait(WAIT_S) if name in ("doomed", "slow") else True,
                                             read(name, path))[1]
    waiting = engine.stats().waiting
    try:
        with cf.ThreadPoolExecutor(8) as ex:
            slow = ex.submit(complete, served.url, "slow")
            _wait(lambda: engine.stats().waiting == waiting + 1, "'slow' parked")
            doomed = [ex.submit(complete, served.url, "doomed") for _ in range(2)]
            _wait(lambda: engine.stats().waiting == waiting + 3 and "doomed" in engine.cache._reading,
                  "'doomed' parked, its read at the gate")
            doomed += [ex.submit(complete, served.url, "doomed-queued") for _ in range(2)]  # no slot left
            _wait(lambda: engine.stats().waiting == waiting + 5, "all five parked")
            assert "doomed-queued" in engine.cache._queue, "precondition: one adapter waits for a load slot"
            served.registry.unpublish("adapters", "doomed")
            served.registry.unpublish("adapters", "doomed-queued")
            served.sync.sync_once()
            for f in doomed:
                r = f.result(timeout=WAIT_S)
                err = r.json()["error"]
                assert r.status_code == 404 and err["code"] == "model_not_found", r.text
                assert err["type"] == "not_found_error" and err["param"] == "model"
                assert "The model 'doomed" in err["message"], err
            assert not slow.done(), "the gate still holds 'slow': it waits, it is not failed"
            gate.set()
            assert text(slow.result(timeout=WAIT_S)) == reference[0]
    finally:
        gate.set()
        engine.cache._read = read
    assert complete(served.url, "doomed").status_code == 404
    assert {"doomed", "doomed-queued"}.isdisjoint(states(served))


@pytest.mark.slow  # ~15-30 s on 2 cores: 50-100 adapter loads through a cache of 4
def test_a_burst_for_50_adapters_not_loaded_all_complete(served, reference):
    """50 names none of which is held (the cache holds 4), asked for at once: every request completes with
    its own adapter's answer, and the cache evicted to make room."""
    from prometheus_client.parser import text_string_to_metric_families

    def metric(name: str) -> float:
        for fam in text_string_to_metric_families(httpx.get(f"{served.url}/metrics", timeout=10).text):
            for s in fam.samples:
                if s.name == name:
                    return s.value
        raise AssertionError(f"{name} not in /metrics")

    held = set(served.engine.adapters)
    picked = [i for i in range(N_ADAPTERS - 1, -1, -1) if name_of(i) not in held][:50]
    evictions = metric("tunestack_adapter_evictions_total")
    with cf.ThreadPoolExecutor(50) as ex:
        got = list(ex.map(lambda i: complete(served.url, name_of(i)), picked))
    assert [r.status_code for r in got] == [200] * 50, [r.text for r in got if r.status_code != 200][:2]
    assert [text(r) for r in got] == [reference[i % SEEDS] for i in picked]
    assert metric("tunestack_adapter_evictions_total") - evictions >= 50 - CACHE
    assert 1 <= metric("tunestack_adapters_held") <= CACHE
