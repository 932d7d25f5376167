"""The vLLM backend's proxy against a stub vLLM (no model): relaying, usage it asks for itself, labels, errors."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve.app import build_app, set_serving
from serve.metrics import Metrics
from serve.settings import Settings
from serve.vllm_proxy import VLLMProxy

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
WHOLE = json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "base",
                    "choices": [{"index": 0, "text": "hi", "finish_reason": "length", "logprobs": None}],
                    "usage": USAGE}).encode()


class StubVLLM(BaseHTTPRequestHandler):
    """Answers like vLLM's OpenAI server; remembers the last body it got."""

    protocol_version = "HTTP/1.1"
    last_body: dict = {}

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if self.path == "/tokenize":
            return self._send(json.dumps({"count": len(body["prompt"].split())}).encode(), "application/json")
        type(self).last_body = body
        if not body.get("stream"):
            return self._send(WHOLE, "application/json")
        chunks = [{"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": t}]} for t in ("h", "i")]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({"id": "c", "object": "text_completion", "choices": [], "usage": USAGE})
        self._send(b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n",
                   "text/event-stream")

    def _send(self, data: bytes, mimetype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", mimetype)
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


def _client(url: str):
    metrics = Metrics()
    app = build_app(Settings(), None, metrics)
    set_serving(app, VLLMProxy(url, "base", None, metrics, max_model_len=64), None)
    return app.test_client(), metrics


def _count(metrics: Metrics, model: str, status: str) -> float | None:
    return metrics.registry.get_sample_value("tunestack_requests_total",
                                             {"model": model, "adapter": "", "status": status})


def test_whole_answer_is_relayed_byte_for_byte(stub_url):
    c, m = _client(stub_url)
    r = c.post("/v1/completions", json={"model": "base", "prompt": "a b", "max_tokens": 2})
    assert r.status_code == 200 and r.data == WHOLE
    assert _count(m, "base", "200") == 1
    assert m.registry.get_sample_value("tunestack_prompt_tokens_total", {"model": "base", "adapter": ""}) == 3
    assert m.registry.get_sample_value("tunestack_requests_in_flight") == 0


def test_stream_usage_is_asked_for_but_not_passed_on(stub_url):
    c, m = _client(stub_url)
    r = c.post("/v1/completions", json={"model": "base", "prompt": "a", "max_tokens": 2, "stream": True})
    lines = [line for line in r.data.decode().split("\n\n") if line]
    assert StubVLLM.last_body["stream_options"] == {"include_usage": True}
    assert lines[-1] == "data: [DONE]" and len(lines) == 3 and '"usage"' not in r.data.decode()
    assert m.registry.get_sample_value("tunestack_generation_tokens_total", {"model": "base", "adapter": ""}) == 2
    r = c.post("/v1/completions", json={"model": "base", "prompt": "a", "stream": True,
                                        "stream_options": {"include_usage": True}})
    assert '"usage"' in r.data.decode().split("\n\n")[-3]  # asked for by the client: passed on


def test_client_leaving_a_stream_is_a_499(stub_url):
    c, m = _client(stub_url)
    r = c.post("/v1/completions", json={"model": "base", "prompt": "a", "stream": True}, buffered=False)
    next(iter(r.response))
    r.close()
    assert _count(m, "base", "499") == 1
    assert m.registry.get_sample_value("tunestack_requests_in_flight") == 0


def test_unknown_names_are_labelled_unknown(stub_url):
    c, m = _client(stub_url)
    c.post("/v1/completions", json={"model": "made-up-1", "prompt": "a"})
    c.post("/v1/completions", json={"model": ["not", "a", "string"], "prompt": "a"})
    assert _count(m, "_unknown", "200") == 2


def test_context_overflow_and_bad_bodies_are_400s(stub_url):
    c, _ = _client(stub_url)
    r = c.post("/v1/completions", json={"model": "base", "prompt": "w " * 40, "max_tokens": 40})
    assert r.status_code == 400 and r.json["error"]["code"] == "context_length_exceeded"
    assert c.post("/v1/completions", data=b"{oops").status_code == 400
    assert c.post("/v1/completions", json=[1, 2]).status_code == 400


def test_vllm_down_is_a_503():
    c, m = _client("http://127.0.0.1:9")  # discard port: nothing listens
    r = c.post("/v1/chat/completions", json={"model": "base", "messages": []})
    assert r.status_code == 503 and r.json["error"]["code"] == "upstream_unavailable"
    assert _count(m, "base", "503") == 1 and m.registry.get_sample_value("tunestack_requests_in_flight") == 0
