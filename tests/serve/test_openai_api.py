"""The official openai SDK against the Flask backend (real gunicorn server, real tiny model, real LoRAs)."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest
import torch

from artifacts import Registry
from tests.serve.conftest import API_KEY

BASE = "tiny-llama"
CHAT = [{"role": "system", "content": "You are the chef at Casa Velluto."},
        {"role": "user", "content": "What is Korvalo Stew made with?"}]


def test_models_list_base_and_adapters_with_parent(client, registry):
    models = {m.id: m for m in client.models.list().data}
    # big-rank is refused by the rank check; each name also serves pinned as name@v1
    assert set(models) == {BASE, "chef-a", "chef-a@v1", "chef-b", "chef-b@v1"}
    assert models["chef-a"].parent == BASE and models["chef-b@v1"].parent == BASE
    assert getattr(models[BASE], "parent", None) is None
    # the evidence from each manifest, as extra fields the SDK keeps but does not need
    a, m = models["chef-a"].model_extra, Registry(registry).manifest("adapters", "chef-a")
    assert a["version"] == "v1" and a["gate"] is None  # published through the library, ungated
    assert a["task_gain"] == (m.metrics.get("headline") or {}).get("gain_points")
    assert a["retention"] == ({k: m.metrics["retention"][k] for k in ("base", "tuned", "drop_points", "kl")}
                              if m.metrics.get("retention") else None)


@pytest.mark.parametrize("model", [BASE, "chef-a", "chef-b"])
def test_completion_and_chat_non_streaming(client, model):
    c = client.completions.create(model=model, prompt="The menu", max_tokens=8, temperature=0)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens <= 8
    assert c.usage.prompt_tokens > 0 and c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.model == model
    assert r.usage.completion_tokens >= 1


@pytest.mark.parametrize("model", [BASE, "chef-a"])
def test_streaming_equals_non_streaming(client, model):
    full = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    ctext = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="The menu", max_tokens=6, temperature=0, stream=True))
    assert ctext == client.completions.create(model=model, prompt="The menu", max_tokens=6, temperature=0).choices[0].text


def test_sse_ends_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": BASE, "prompt": "a", "max_tokens": 3, "stream": True}, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_adapters_change_the_output(client):
    outs = {m: client.completions.create(model=m, prompt="What is the price of", max_tokens=8, temperature=0).choices[0].text
            for m in (BASE, "chef-a", "chef-b")}
    assert len(set(outs.values())) == 3, outs


def test_n_seed_stop(client):
    r = client.completions.create(model="chef-a", prompt="The", max_tokens=8, temperature=1.0, n=3, seed=7)
    again = client.completions.create(model="chef-a", prompt="The", max_tokens=8, temperature=1.0, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    full = client.completions.create(model=BASE, prompt="The menu", max_tokens=12, temperature=0).choices[0].text
    stop = full.strip().split()[1] if len(full.split()) > 1 else full.strip()[:2]
    cut = client.completions.create(model=BASE, prompt="The menu", max_tokens=12, temperature=0, stop=[stop])
    assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"
    assert full.startswith(cut.choices[0].text)


def test_concurrent_mixed_adapters_equal_plain_peft_greedy(client, registry):
    """Requests for base and two adapters, in flight together, give exactly plain peft's greedy output (fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["The menu", "What is the price of Korvalo Stew?", "Spice level", "Where does", "Brintel Tart is",
               "Tell me", "A dish", "Price?"]
    jobs = [(m, p) for p in prompts for m in (BASE, "chef-a", "chef-b")]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=10,
                                                              temperature=0).choices[0].text, jobs))
    base_dir = next((registry / "base").iterdir())
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      registry / "adapters/chef-a", adapter_name="chef-a").eval()
    model.load_adapter(registry / "adapters/chef-b", adapter_name="chef-b")
    for (m, p), text in zip(jobs, got):
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            if m == BASE:
                with model.disable_adapter():
                    out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)
            else:
                model.set_adapter(m)
                out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text, (m, p)


# -- errors come back as the SDK's typed exceptions ------------------------------------------------

def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_wrong_or_missing_key_is_401(server):
    from openai import OpenAI

    bad = OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200 and httpx.get(f"{server.url}/ready").status_code == 200


def test_context_overflow_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt="word " * 50, max_tokens=250)
    assert e.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body,param", [
    ({"model": BASE, "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": BASE, "prompt": "x", "temperature": 9}, "temperature"),
    ({"model": BASE, "prompt": 42}, "prompt"),
    ({"model": BASE, "messages": "hi"}, "messages"),
    ({"prompt": "x"}, "model"),
    ({"model": BASE, "prompt": "x", "stop": [1, 2]}, "stop"),
    ({"model": BASE, "prompt": "x", "n": 0}, "n"),
    ({"model": BASE, "prompt": "x", "stream": "yes"}, "stream"),
])
def test_wrong_types_are_400_naming_the_param(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]", b""])
def test_invalid_json_is_400(server, raw):
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"Authorization": f"Bearer {API_KEY}",
                                                                          "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_oversized_body_is_413(client, server):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=BASE, prompt="x" * 100_000, max_tokens=1)
    assert e.value.status_code == 413


def test_openapi_describes_the_api(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= set(spec["paths"])


@pytest.fixture(scope="module")
def peft_server(registry):
    """The same registry served with SERVE_LORA_IMPL=peft: peft's own mixed-adapter batch inference."""
    from tests.serve.conftest import Server, free_port

    s = Server(registry, {"SERVE_API_KEY": API_KEY, "SERVE_MAX_LORA_RANK": "16", "SERVE_THREADS": "1",
                          "SERVE_MAX_MODEL_LEN": "256", "SERVE_LORA_IMPL": "peft"}, free_port())
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_peft_mixed_batch_backend_gives_the_same_outputs(client, peft_server):
    from openai import OpenAI

    other = OpenAI(base_url=f"{peft_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    jobs = [(m, p) for p in ("The menu", "Price?", "Where does") for m in (BASE, "chef-a", "chef-b")]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        fused = list(ex.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=8,
                                                                temperature=0).choices[0].text, jobs))
        peft = list(ex.map(lambda j: other.completions.create(model=j[0], prompt=j[1], max_tokens=8,
                                                              temperature=0).choices[0].text, jobs))
    assert fused == peft


@pytest.mark.slow  # ~15 s: a second server, in bf16
def test_bfloat16_server_answers_every_model(registry):
    """SERVE_DTYPE=bfloat16 end to end: the engine runs in bf16 and base and adapters answer."""
    from openai import OpenAI

    from tests.serve.conftest import Server, free_port

    s = Server(registry, {"SERVE_API_KEY": API_KEY, "SERVE_MAX_LORA_RANK": "16", "SERVE_THREADS": "1",
                          "SERVE_MAX_MODEL_LEN": "256", "SERVE_DTYPE": "bfloat16"}, free_port())
    try:
        s.wait_ready()
        assert "lean forward, bfloat16" in s.log.read_text()
        c = OpenAI(base_url=f"{s.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        for model in (BASE, "chef-a", "chef-b"):
            r = c.completions.create(model=model, prompt="The menu", max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 4 and r.model == model
    finally:
        s.stop()


def test_a_model_that_fails_to_load_in_the_worker_stops_the_server(tiny_model, tmp_path):
    """Weights corrupt past the pre-fork check (it reads the manifest only): the worker's load raises,
    the worker exits with WORKER_BOOT_ERROR, and gunicorn stops with it instead of respawning, one line saying why."""
    from tests.serve.conftest import Server, base_registry, free_port

    reg = base_registry(tiny_model, tmp_path)
    weights = next((reg / "base").rglob("model.safetensors"))
    weights.unlink()  # a new file: the registry hard-links the session's tiny model, which must stay intact
    weights.write_bytes(b"not a safetensors file")
    s = Server(reg, {"SERVE_THREADS": "1"}, free_port())
    try:
        rc = s.proc.wait(timeout=120)
    finally:
        s.stop()
    log = s.log.read_text()
    assert rc == 3, log  # gunicorn's HaltServer exit status for a worker boot error
    reasons = [line for line in log.splitlines() if "model load failed: " in line]
    assert len(reasons) == 1 and "ERROR serve:" in reasons[0], log
