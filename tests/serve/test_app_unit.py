"""App-level behaviour that needs no model: readiness, settings, protocol parsing, and the serving layer's faults
(load failure, stream timeout, in-flight leaks, empty prompts, drain) over an engine with one injected fault."""

from __future__ import annotations

import json
import threading

import pytest

from serve.http.app import build_app, set_serving
from serve.openai.backend import EventStream
from serve.process.drain import drain_of
from serve.engines.base import Engine, EngineStats, TextDelta
from serve.errors import APIError
from serve.metrics import Metrics
from serve.openai.protocol import ChatCompletionRequest, CompletionRequest
from serve.flask_backend.server import load_in_background
from serve.flask_backend.serving import OpenAIServing
from serve.settings import Settings


def test_not_ready_is_503_and_health_stays_up():
    app = build_app(Settings(), None, Metrics())
    c = app.test_client()
    assert c.get("/health").status_code == 200
    assert c.get("/ready").status_code == 503
    r = c.post("/v1/completions", json={"model": "x", "prompt": "y"})
    assert r.status_code == 503 and r.json["error"]["code"] == "not_ready"
    assert c.get("/admin/adapters").status_code == 404  # admin API off without a key
    assert b"tunestack playground" in c.get("/").data


@pytest.mark.parametrize("env,message", [
    ({"SERVE_API_KEY": "changeme"}, "placeholder"),
    ({"SERVE_ADMIN_KEY": "short"}, "placeholder"),
    ({"SERVE_BACKEND": "tgi"}, "choose flask or vllm"),
    ({"SERVE_PORT": "eighty"}, "not a valid int"),
    ({"SERVE_FORWARD": "fast"}, "choose lean or transformers"),
    ({"SERVE_DTYPE": "fp8"}, "choose auto, float32"),
    ({"SERVE_DTYPE": "float16"}, "on a CPU use bfloat16"),
    ({"SERVE_ENGINE": "onnx", "SERVE_DTYPE": "bfloat16"}, "its own precision"),
])
def test_unsafe_settings_are_refused(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_settings_from_env():
    s = Settings.from_env({"SERVE_PORT": "9000", "SERVE_MAX_BATCH": "8", "SERVE_REGISTRY": "/r",
                           "SERVE_FORWARD": "transformers"})
    assert s.port == 9000 and s.max_batch == 8 and str(s.registry) == "/r" and s.forward == "transformers"
    assert Settings().forward == "lean"


def test_protocol_defaults_and_limits():
    r = CompletionRequest.parse({"model": "m", "prompt": ["one"], "stop": "\n", "temperature": 0})
    assert r.prompt == "one" and r.params.stop == ["\n"] and r.params.greedy and r.params.max_tokens == 16
    c = ChatCompletionRequest.parse({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}]})
    assert c.messages == [{"role": "system", "content": "hi"}]
    with pytest.raises(APIError) as e:
        CompletionRequest.parse({"model": "m", "prompt": "x", "stop": ["a"] * 5})
    assert e.value.status == 400 and e.value.param == "stop"


@pytest.mark.parametrize("dtype,cpu,flag", [("auto", True, "float32"), ("auto", False, None),
                                            ("bfloat16", True, "bfloat16"), ("float16", False, "float16")])
def test_vllm_dtype_follows_settings(dtype, cpu, flag):
    from serve.vllm.command import vllm_command

    cmd = vllm_command(Settings.from_env({"SERVE_BACKEND": "vllm", "SERVE_DTYPE": dtype}), "/m", "m", 16, 9, cpu)
    assert (cmd[cmd.index("--dtype") + 1] if "--dtype" in cmd else None) == flag


# -- faults of the serving layer and the app (issue 12) ---------------------------------------------
class FaultyEngine(Engine):
    """An engine with one injected fault: `tokenize_error` raises from tokenize, `silent` never answers,
    otherwise each submitted row gets one TextDelta and is left open (a long generation)."""

    model_name, max_model_len = "m", 64

    def __init__(self, tokenize_error: Exception | None = None, silent: bool = False):
        self.tokenize_error, self.silent = tokenize_error, silent

    def submit(self, req) -> None:
        if not self.silent:
            req.events.put(TextDelta(req.index, "hi"))

    def tokenize(self, text: str) -> list[int]:
        if self.tokenize_error:
            raise self.tokenize_error
        return [1, 2]

    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        return self.tokenize("")

    def load_adapter(self, name: str, path: str) -> None: ...
    def unload_adapter(self, name: str) -> None: ...
    def stats(self) -> EngineStats:
        return EngineStats()
    def shutdown(self) -> None: ...


def _count(m: Metrics, status: str) -> float | None:
    return m.registry.get_sample_value("tunestack_requests_total", {"model": "m", "adapter": "", "status": status})


def _in_flight(m: Metrics) -> float | None:
    return m.registry.get_sample_value("tunestack_requests_in_flight")


def test_stream_timeout_is_recorded_as_503_not_200():
    m = Metrics()
    serving = OpenAIServing(FaultyEngine(silent=True), None, m, event_timeout_s=0.05)
    chunks = list(serving.completions(b'{"model": "m", "prompt": "x", "stream": true}').events)
    assert chunks[-1]["error"]["code"] == "timeout"
    assert _count(m, "503") == 1 and _count(m, "200") is None and _in_flight(m) == 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_unexpected_error_does_not_leak_the_in_flight_gauge(stream):
    """A tokenizer that raises something other than an APIError ("Already borrowed"): 500, gauge back to 0."""
    m = Metrics()
    app = build_app(Settings(), OpenAIServing(FaultyEngine(RuntimeError("Already borrowed")), None, m), m)
    r = app.test_client().post("/v1/completions", json={"model": "m", "prompt": "x", "stream": stream})
    assert r.status_code == 500 and r.json["error"]["message"] == "internal error"
    assert "Already borrowed" not in r.text  # the traceback goes to the log, not to the client
    assert _in_flight(m) == 0 and _count(m, "500") == 1


def test_a_stream_closed_before_its_first_chunk_releases_the_gauge():
    """A stream the server never iterates (client gone before the headers): closing it counts it out."""
    m = Metrics()
    serving = OpenAIServing(FaultyEngine(), None, m)
    replies = [serving.completions(b'{"model": "m", "prompt": "x", "stream": true}') for _ in range(3)]
    assert all(isinstance(r, EventStream) for r in replies) and _in_flight(m) == 3
    for r in replies:
        r.events.close()
    assert _in_flight(m) == 0 and _count(m, "499") == 3


@pytest.mark.parametrize("path,fields,param", [
    ("/v1/completions", {"prompt": ""}, "prompt"), ("/v1/completions", {"prompt": [""]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"), ("/v1/completions", {"prompt": [7, 8]}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
])
def test_empty_prompt_is_400_even_when_the_tokenizer_adds_a_token(path, fields, param):
    """FaultyEngine.tokenize("") is [1, 2], as a tokenizer that adds BOS: the text itself is checked."""
    m = Metrics()
    app = build_app(Settings(), OpenAIServing(FaultyEngine(), None, m), m)
    r = app.test_client().post(path, json={"model": "m", **fields})
    assert r.status_code == 400 and r.json["error"]["param"] == param, r.json
    assert _in_flight(m) == 0


def test_failed_model_load_makes_health_and_ready_503_with_the_reason(tmp_path):
    """The real TorchEngine on a folder that is not a model: the reason is served, and on_failure runs."""
    from serve.engines.torch_engine import TorchEngine

    app = build_app(Settings(), None, Metrics())
    failed = threading.Event()
    load_in_background(app, lambda: TorchEngine(str(tmp_path / "missing"), "m"), on_failure=failed.set).join(60)
    assert failed.is_set()
    c = app.test_client()
    for path in ("/health", "/ready"):
        r = c.get(path)
        assert r.status_code == 503 and r.json["status"] == "failed"
        assert r.json["reason"].startswith("model load failed: ") and "\n" not in r.json["reason"]
    assert c.post("/v1/completions", json={"model": "m", "prompt": "x"}).json["error"]["code"] == "load_failed"


def test_drain_flips_ready_refuses_new_requests_and_waits_for_open_streams():
    m = Metrics()
    app = build_app(Settings(drain_seconds=7), None, m)
    set_serving(app, OpenAIServing(FaultyEngine(), None, m), None)
    c = app.test_client()
    open_stream = c.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True}, buffered=False)
    drain = drain_of(app)
    assert drain.seconds == 7 and drain.active == 1  # the stream is in progress until its response closes
    drain.begin()
    with c.get("/ready") as r:
        assert r.status_code == 503 and r.json == {"status": "draining"}
    with c.get("/health") as r:
        assert r.status_code == 200  # alive: the kubelet must not restart a draining pod
    with c.post("/v1/completions", json={"model": "m", "prompt": "x"}) as r:
        assert r.status_code == 503 and r.json["error"]["code"] == "draining"
    assert not drain.wait_idle(0.01) and drain.active == 1
    assert json.loads(next(open_stream.response)[6:])["choices"][0]["text"] == "hi"  # it still streams
    open_stream.response.close()  # what the WSGI server does once the client is gone
    assert drain.wait_idle(5) and drain.active == 0 and _in_flight(m) == 0
