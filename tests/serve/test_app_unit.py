"""App-level behaviour that needs no model: readiness, settings validation, protocol parsing."""

from __future__ import annotations

import pytest

from serve.app import build_app
from serve.errors import APIError
from serve.metrics import Metrics
from serve.protocol import ChatCompletionRequest, CompletionRequest
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
    from serve.vllm_backend import vllm_command

    cmd = vllm_command(Settings.from_env({"SERVE_BACKEND": "vllm", "SERVE_DTYPE": dtype}), "/m", "m", 16, {}, 9, cpu)
    assert (cmd[cmd.index("--dtype") + 1] if "--dtype" in cmd else None) == flag
