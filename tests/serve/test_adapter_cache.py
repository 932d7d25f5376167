"""The adapter cache (serve/engines/adapter_cache.py): LRU eviction, loading on first request off the engine
thread, adapters in use never evicted, failures reported; with fake read/install/evict for the logic.
The tiny-model tests at the end run the real engine and server; tests/reliability/test_adapter_faults.py the
faults at scale (a corrupt adapter among many, a removal while requests wait, a burst over many adapters)."""

from __future__ import annotations

import threading
import time

import pytest

from serve.engines.adapter_cache import AdapterCache, Refusal, Settled, gone
from serve.metrics import Metrics

WAIT_S = 30  # a bound on waiting for the loader threads, never a timing assertion


class Fake:
    """read/install/evict that record what the cache asked for; `gates` hold a name's read until set."""

    def __init__(self, fail: dict[str, str] | None = None):
        self.installed: dict[str, str] = {}
        self.evicted: list[str] = []
        self.reads: list[tuple[str, str]] = []
        self.fail = fail or {}
        self.gates: dict[str, threading.Event] = {}

    def read(self, name: str, path: str) -> str:
        self.reads.append((name, path))
        gate = self.gates.get(name)
        if gate is not None:
            assert gate.wait(WAIT_S)
        if name in self.fail:
            raise ValueError(self.fail[name])
        return f"weights of {path}"

    def install(self, name: str, path: str, weights: str, victims: tuple[str, ...]) -> None:
        assert weights == f"weights of {path}"
        for v in victims:
            self.evict(v)
        self.installed[name] = path

    def evict(self, name: str) -> None:
        self.evicted.append(name)
        del self.installed[name]


def cache_of(capacity: int, names=("a", "b", "c", "d"), **fake) -> tuple[AdapterCache, Fake, Metrics]:
    f, m = Fake(**fake), Metrics()
    c = AdapterCache(capacity, f.read, f.install, f.evict, m)
    for n in names:
        c.register(n, f"/reg/{n}/v1")
    return c, f, m


def settle_until(c: AdapterCache, cond, in_use=frozenset()) -> Settled:
    """Settle (what the engine does between steps) until `cond(all settled so far)` holds."""
    total = Settled()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        s = c.settle(set(in_use))
        total.resumed += s.resumed
        total.failed += s.failed
        if cond(total):
            return total
        time.sleep(0.005)
    raise AssertionError(f"not settled: resumed {total.resumed}, failed {total.failed}")


def load(c: AdapterCache, name: str, in_use=frozenset()) -> None:
    assert c.park(name, f"req-{name}") is None
    settle_until(c, lambda s: f"req-{name}" in s.resumed, in_use)


def value(m: Metrics, metric: str) -> float:
    return m.registry.get_sample_value(metric)


def test_least_recently_used_is_evicted_and_counted():
    c, f, m = cache_of(2)
    load(c, "a")
    load(c, "b")
    assert list(c.held) == ["a", "b"] and c.parked == 0
    c.settle({"a"})  # a runs a step: now b is the least recently used
    load(c, "c")
    assert f.evicted == ["b"] and list(c.held) == ["a", "c"] and f.installed == {"a": "/reg/a/v1", "c": "/reg/c/v1"}
    assert value(m, "tunestack_adapter_evictions_total") == 1
    assert value(m, "tunestack_adapter_loads_total") == 3
    assert value(m, "tunestack_adapters_held") == 2
    assert value(m, "tunestack_adapter_load_duration_seconds_count") == 3


def test_an_adapter_in_use_is_never_evicted():
    c, f, _ = cache_of(1)
    load(c, "a")
    assert c.park("b", "req-b") is None
    for _ in range(50):  # b's read finishes meanwhile, but a runs: b waits for room
        assert c.settle({"a"}).resumed == []
        time.sleep(0.002)
    assert list(c.held) == ["a"] and f.evicted == [] and c.parked == 1
    settle_until(c, lambda s: s.resumed == ["req-b"])  # a's rows are done
    assert f.evicted == ["a"] and list(c.held) == ["b"] and c.parked == 0


def test_a_slow_load_does_not_hold_up_another_adapter():
    c, f, _ = cache_of(4)
    f.gates["a"] = threading.Event()
    assert c.park("a", "req-a") is None
    load(c, "b")  # served while a is still being read
    assert "a" not in c.held and c.parked == 1
    f.gates["a"].set()
    settle_until(c, lambda s: s.resumed == ["req-a"])


def test_requests_for_one_adapter_share_one_read():
    c, f, _ = cache_of(2)
    for i in range(5):
        assert c.park("a", f"r{i}") is None
    s = settle_until(c, lambda s: len(s.resumed) == 5)
    assert s.resumed == [f"r{i}" for i in range(5)] and f.reads == [("a", "/reg/a/v1")]


def test_unknown_adapter_is_refused_without_a_read():
    c, f, _ = cache_of(2)
    assert c.park("nope", "r") == Refusal("The model 'nope' does not exist (adapter 'nope' is not in the registry)",
                                          gone=True)
    assert f.reads == []


def test_a_failed_load_fails_its_requests_with_the_reason_and_reports_it_once():
    c, f, m = cache_of(2, fail={"bad": "SafetensorError: header too large"}, names=("a", "bad"))
    reports = []
    c.on_failure = lambda *a: reports.append(a)
    assert c.park("bad", "r1") is None and c.park("bad", "r2") is None and c.park("a", "ra") is None
    s = settle_until(c, lambda s: s.failed and s.resumed)
    assert s.resumed == ["ra"]  # the others serve
    msg = Refusal("adapter 'bad' could not be loaded: ValueError: SafetensorError: header too large")
    assert s.failed == [(["r1", "r2"], msg)] and c.parked == 0
    deadline = time.monotonic() + WAIT_S
    while not reports and time.monotonic() < deadline:
        time.sleep(0.005)
    assert reports == [("bad", "/reg/bad/v1", "ValueError: SafetensorError: header too large")]
    assert c.park("bad", "r3") == msg, "a known failure is refused at once, not read again"
    assert [r for r in f.reads if r[0] == "bad"] == [("bad", "/reg/bad/v1")]
    assert "bad" not in c.held and value(m, "tunestack_adapter_loads_total") == 1
    del f.fail["bad"]
    c.register("bad", "/reg/bad/v2")  # re-published: a new chance
    load(c, "bad")
    assert f.installed["bad"] == "/reg/bad/v2"


def test_forget_drops_the_weights_and_fails_parked_requests():
    c, f, _ = cache_of(2)
    load(c, "a")
    f.gates["b"] = threading.Event()
    assert c.park("b", "rb") is None
    c.settle(set())
    c.unregister("b")
    assert c.forget("b") == (["rb"], gone("b")) and gone("b").gone, "removed: not found (404), not a failure"
    assert c.forget("a") == ([], gone("a")) and f.evicted == ["a"] and not c.held
    f.gates["b"].set()
    for _ in range(20):  # the read of b ends: nothing is installed for a name no longer served
        assert c.settle(set()) == Settled()
        time.sleep(0.002)
    assert "b" not in f.installed and c.park("b", "x") == gone("b")


def test_a_republish_during_the_read_serves_the_new_version():
    c, f, _ = cache_of(2)
    f.gates["a"] = threading.Event()
    assert c.park("a", "ra") is None
    c.settle(set())
    c.register("a", "/reg/a/v2")
    f.gates["a"].set()
    settle_until(c, lambda s: s.resumed == ["ra"])
    assert f.installed == {"a": "/reg/a/v2"} and f.reads == [("a", "/reg/a/v1"), ("a", "/reg/a/v2")]


def test_close_returns_every_parked_request():
    c, f, _ = cache_of(2)
    f.gates["a"] = threading.Event()
    assert c.park("a", "r1") is None and c.park("b", "r2") is None
    c.settle(set())
    assert sorted(c.close()) == ["r1", "r2"] and c.parked == 0
    f.gates["a"].set()


def test_capacity_must_hold_one_adapter():
    with pytest.raises(ValueError):
        AdapterCache(0, str, print, print)


# -- on the tiny model: the real engine, and the real server (python -m serve) ----------------------------
def _outcome(req) -> tuple[str, object]:
    from serve.engines.base import TextDelta

    text = ""
    while True:
        ev = req.events.get(timeout=WAIT_S)
        if not isinstance(ev, TextDelta):
            return text, ev
        text += ev.text


@pytest.mark.parametrize("lora_impl", ["fused", "peft"])
def test_the_batch_keeps_stepping_while_an_adapter_loads(tiny_model, tmp_path, lora_impl):
    """cap 1, a read held at a gate: the base request finishes meanwhile; the adapter's request then does too.
    Then y evicts x, and x comes back with the same output (peft: the reference path, installs on the engine thread)."""
    from serve.engines.base import Finished, GenRequest, SamplingParams
    from serve.engines.torch_engine import TorchEngine
    from tests.reliability.test_registry_faults import make_run

    engine = TorchEngine(str(tiny_model), "tiny-llama", max_batch=4, max_model_len=256, max_loaded_adapters=1,
                         lora_impl=lora_impl)
    try:
        engine.load_adapter("x", str(make_run(tiny_model, tmp_path / "x", 1) / "adapter"))
        engine.load_adapter("y", str(make_run(tiny_model, tmp_path / "y", 2) / "adapter"))
        assert not engine.adapters, "registering reads no weights"
        gate, read = threading.Event(), engine.cache._read
        engine.cache._read = lambda name, path: (gate.wait(WAIT_S), read(name, path))[1]
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        prompt = engine.tokenize("The menu")
        on_x, on_base = GenRequest(prompt, "x", params), GenRequest(prompt, None, params)
        engine.submit(on_x)
        engine.submit(on_base)
        base_text, base_end = _outcome(on_base)
        assert base_end == Finished(0, "length", 8) and on_x.events.empty() and engine.stats().waiting == 1
        gate.set()
        x_text, x_end = _outcome(on_x)
        assert x_end == Finished(0, "length", 8) and x_text != base_text and list(engine.adapters) == ["x"]
        texts = {}
        for name in ("y", "x"):  # cap 1: each evicts the other
            req = GenRequest(engine.tokenize("The menu"), name, params)
            engine.submit(req)
            texts[name] = _outcome(req)[0]
            assert list(engine.adapters) == [name]
        assert texts["x"] == x_text and texts["y"] not in (x_text, base_text)
    finally:
        engine.shutdown()


ADAPTERS = {f"chef-{i}": i for i in range(1, 6)}  # name -> seed: more than SERVE_MAX_LOADED_ADAPTERS=2
PROMPTS = ("The menu", "Soup of the day is")


def _peft_greedy(tiny_model, registry, prompts, n_tokens: int) -> dict[tuple[str, str], str]:
    """What plain peft generates for each adapter and prompt (greedy, fp32): the reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    out = {}
    for name in ADAPTERS:
        model = PeftModel.from_pretrained(base, registry / "adapters" / name).eval()
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                gen = model.generate(input_ids=ids, max_new_tokens=n_tokens, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out[name, p] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        base = model.unload()
    return out


@pytest.fixture(scope="module")
def cached_server(tiny_model, tmp_path_factory):
    from artifacts import Registry
    from tests.reliability.test_registry_faults import make_run
    from tests.serve.conftest import API_KEY, start_server

    work = tmp_path_factory.mktemp("adapter-cache")
    reg = Registry(work / "registry")
    for name, seed in ADAPTERS.items():
        reg.publish_run(make_run(tiny_model, work / "runs" / name, seed), name)
    s = start_server(work / "registry", {"SERVE_API_KEY": API_KEY, "SERVE_MAX_LOADED_ADAPTERS": "2",
                                         "SERVE_MAX_LORA_RANK": "16", "SERVE_THREADS": "2", "SERVE_MAX_BATCH": "8",
                                         "SERVE_MAX_MODEL_LEN": "256"})
    s.work = work
    yield s
    s.stop()


def _get(server, path: str):
    import httpx

    from tests.serve.conftest import API_KEY

    return httpx.get(f"{server.url}{path}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


def _complete(server, model: str, prompt: str):
    import httpx

    from tests.serve.conftest import API_KEY

    return httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                      json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})


def _metric(server, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(_get(server, "/metrics").text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} not in /metrics")


def _models(server) -> set[str]:
    return {m["id"] for m in _get(server, "/v1/models").json()["data"]}


def test_more_adapters_than_the_cache_all_serve_their_own_outputs(tiny_model, cached_server):
    import concurrent.futures as cf

    assert _models(cached_server) >= set(ADAPTERS), "every servable entry is listed, loaded or not"
    assert _metric(cached_server, "tunestack_adapters_held") == 0, "start-up reads no adapter weights"
    expected = _peft_greedy(tiny_model, cached_server.work / "registry", PROMPTS, 8)
    assert len(set(expected.values())) > len(PROMPTS), "precondition: the adapters change the outputs"
    jobs = [(m, p) for _ in range(2) for m in ADAPTERS for p in PROMPTS]  # spread over all 5, twice
    with cf.ThreadPoolExecutor(10) as ex:
        replies = list(ex.map(lambda j: _complete(cached_server, *j), jobs))
    assert [r.status_code for r in replies] == [200] * len(jobs), [r.text for r in replies if r.status_code != 200][:2]
    got = {j: r.json()["choices"][0]["text"] for j, r in zip(jobs, replies)}
    assert got == expected
    assert _metric(cached_server, "tunestack_adapter_loads_total") >= len(ADAPTERS)
    assert _metric(cached_server, "tunestack_adapter_evictions_total") >= len(ADAPTERS) - 2
    assert 1 <= _metric(cached_server, "tunestack_adapters_held") <= 2
    assert _metric(cached_server, "tunestack_adapter_load_duration_seconds_count") >= len(ADAPTERS)
    assert _models(cached_server) >= set(ADAPTERS)


def test_an_adapter_that_fails_to_load_on_demand_is_refused_clearly_and_the_others_serve(tiny_model, cached_server):
    """Its files go after it was registered: its request gets a 503 with the reason, then it is marked failed."""
    from artifacts import Registry
    from tests.reliability.test_registry_faults import make_run

    reg = Registry(cached_server.work / "registry")
    reg.publish_run(make_run(tiny_model, cached_server.work / "runs" / "ghost", 9), "ghost")
    deadline = time.monotonic() + WAIT_S
    while "ghost" not in _models(cached_server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "ghost" in _models(cached_server)
    (reg.path("adapters", "ghost") / "adapter_model.safetensors").unlink()
    r = _complete(cached_server, "ghost", "The menu")
    err = r.json()["error"]
    assert r.status_code == 503 and err["type"] == "service_unavailable", r.text
    assert "adapter 'ghost' could not be loaded: adapter files disappeared" in err["message"], err
    while "ghost" in _models(cached_server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "ghost" not in _models(cached_server), "marked failed by the registry sync"
    assert _complete(cached_server, "ghost", "The menu").status_code == 404
    assert _metric(cached_server, 'tunestack_adapter_load_failures_total') >= 1
    expected = _peft_greedy(tiny_model, cached_server.work / "registry", PROMPTS[:1], 8)
    for name in ADAPTERS:
        r = _complete(cached_server, name, PROMPTS[0])
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[name, PROMPTS[0]]
