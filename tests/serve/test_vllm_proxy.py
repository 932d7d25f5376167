"""The vLLM backend's proxy against a stub vLLM (no model): relaying, usage it asks for itself, labels, errors,
vLLM's queue in /metrics, and vLLM failing (stalls, cut streams, plain-text 500s): every request ends."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve.http.app import build_app, set_serving
from serve.engines.base import EngineStats
from serve.metrics import Metrics
from serve.settings import Settings
from serve.vllm.proxy import STATS_STALE, VLLMProxy, _SchedulerGauges, scheduler_counts

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
WHOLE = json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "base",
                    "choices": [{"index": 0, "text": "hi", "finish_reason": "length", "logprobs": None}],
                    "usage": USAGE}).encode()


VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="base"} 2.0
vllm:num_requests_running{engine="1",model_name="base"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="base"} 5.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="base",reason="capacity"} 5.0
"""
STALL_SECONDS = 3.0  # the stub's silence in the stall faults: well past the proxy's test timeout of 0.5 s


class StubVLLM(BaseHTTPRequestHandler):
    """Answers like vLLM's OpenAI server; remembers the last body it got and counts prompts it saw.

    Prompts starting "fault:" make it fail like a broken vLLM does (see _fault)."""

    protocol_version = "HTTP/1.1"
    last_body: dict = {}
    seen: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/metrics":
            return self._send(VLLM_METRICS.encode(), "text/plain")
        self._send(json.dumps({"object": "list", "data": [{"id": "base"}]}).encode(), "application/json")

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if self.path == "/tokenize":
            return self._send(json.dumps({"count": len(body["prompt"].split())}).encode(), "application/json")
        type(self).last_body = body
        prompt = str(body.get("prompt", ""))
        type(self).seen[prompt] = type(self).seen.get(prompt, 0) + 1
        if prompt.startswith("fault:"):
            return self._fault(prompt[6:])
        if not body.get("stream"):
            return self._send(WHOLE, "application/json")
        chunks = [{"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": t}]} for t in ("h", "i")]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({"id": "c", "object": "text_completion", "choices": [], "usage": USAGE})
        self._send(b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n",
                   "text/event-stream")

    def _fault(self, kind: str) -> None:
        """stall: silent; stall-mid-stream / cut-stream: one chunk, then silent / gone; drop: closes at once;
        plain-500: the plain-text 500 an HTTP layer gives."""
        if kind == "drop":
            self.close_connection = True
            return
        if kind == "plain-500":
            return self._send(b"Internal Server Error", "text/plain", 500)
        if kind == "stall":
            time.sleep(STALL_SECONDS)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b'data: {"id":"c","object":"text_completion","choices":[{"index":0,"text":"h"}]}\n\n'
        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.flush()
        if kind == "stall-mid-stream":
            time.sleep(STALL_SECONDS)
        self.close_connection = True

    def _send(self, data: bytes, mimetype: str, status: int = 200) -> None:
        self.send_response(status)
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


def _client(url: str, timeout: float = 30):
    metrics = Metrics()
    app = build_app(Settings(), None, metrics)
    set_serving(app, VLLMProxy(url, "base", None, metrics, max_model_len=64, timeout=timeout), None)
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
    r = c.post("/v1/completions", json={"model": ["not", "a", "string"], "prompt": "a"})
    assert r.status_code == 400 and r.json["error"]["param"] == "model"  # the protocol's rules, before vLLM
    assert _count(m, "_unknown", "404") == 1 and _count(m, "_unknown", "400") == 1  # 404: not served, not sent


def test_the_proxy_applies_the_protocol_and_drops_nulls(stub_url):
    """Found by fuzzing the vLLM backend: a missing model reached vLLM (which picked its own); a null
    `ignore_eos`, empty stop strings and top_p 0 were refused by vLLM though the API allows them."""
    c, _ = _client(stub_url)
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json["error"]["param"] == "model"
    r = c.post("/v1/completions", json={"model": "base", "prompt": "a", "max_tokens": 2, "ignore_eos": None,
                                        "stream_options": {"include_usage": True}, "stop": ["", "x", ""], "top_p": 0})
    assert r.status_code == 200
    assert StubVLLM.last_body == {"model": "base", "prompt": "a", "max_tokens": 2, "stop": ["x"], "top_p": 1e-9}
    c.post("/v1/completions", json={"model": "base", "prompt": "a", "max_tokens": 2, "stop": ["", ""]})
    assert StubVLLM.last_body == {"model": "base", "prompt": "a", "max_tokens": 2}


def test_vllm_errors_are_reshaped_to_openai_types():
    from serve.vllm.proxy import _openai_error

    body = json.loads(_openai_error(400, json.dumps({"error": {"message": "bad", "type": "BadRequestError",
                                                               "param": None, "code": 400}}).encode()))
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}
    ctx = json.loads(_openai_error(400, json.dumps({"error": {
        "message": "This model's maximum context length is 96 tokens. However, your prompt contains at least 97",
        "type": "BadRequestError", "param": "input_tokens", "code": 400}}).encode()))
    assert ctx["error"]["code"] == "context_length_exceeded" and ctx["error"]["param"] == "input_tokens"


def test_context_overflow_and_bad_bodies_are_400s(stub_url):
    c, _ = _client(stub_url)
    r = c.post("/v1/completions", json={"model": "base", "prompt": "w " * 40, "max_tokens": 40})
    assert r.status_code == 400 and r.json["error"]["code"] == "context_length_exceeded"
    assert c.post("/v1/completions", data=b"{oops").status_code == 400
    assert c.post("/v1/completions", json=[1, 2]).status_code == 400


def test_vllm_down_is_a_503():
    c, m = _client("http://127.0.0.1:9")  # discard port: nothing listens
    r = c.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json["error"]["code"] == "upstream_unavailable"
    assert _count(m, "base", "503") == 1 and m.registry.get_sample_value("tunestack_requests_in_flight") == 0


def test_vllm_queue_reaches_the_metrics(stub_url):
    """KEDA scales on tunestack_requests_queued: the proxy reports vLLM's own waiting and running counts."""
    c, m = _client(stub_url)
    text = c.get("/metrics").get_data(as_text=True)
    assert "tunestack_requests_queued 5.0" in text and "tunestack_requests_running 3.0" in text
    assert scheduler_counts("garbage\nvllm:num_requests_waiting{x=\"1\"} not-a-number\n").waiting == 0


def test_vllm_queue_unreadable_is_zero_not_an_error():
    c, _ = _client("http://127.0.0.1:9")
    r = c.get("/metrics")
    assert r.status_code == 200 and "tunestack_requests_queued 0.0" in r.get_data(as_text=True)


def test_a_failed_queue_scrape_keeps_the_last_reading_until_it_is_stale(stub_url):
    """A saturated vLLM answers /metrics slowly: the queue must not read as empty just then (CI saw it)."""
    host, port = stub_url.rsplit("/", 1)[1].split(":")
    gauges = _SchedulerGauges(host, int(port))
    assert gauges.read().waiting == 5
    gauges.port, gauges._at = 9, float("-inf")  # vLLM stops answering; the next read scrapes again
    assert gauges.read().waiting == 5  # the last good reading, younger than STATS_STALE
    gauges._at = gauges._good_at = gauges._good_at - STATS_STALE - 1  # that reading is now too old
    assert gauges.read().waiting == 0


def test_the_queue_is_floored_by_the_requests_the_proxy_has_in_vllm(stub_url):
    """vLLM's /metrics unanswered (saturated) while three requests are in it, max_batch 1: the gauges still
    say 1 running and 2 waiting, and fall back to 0 once the answers are in."""
    metrics = Metrics()
    app = build_app(Settings(), None, metrics)
    # the stub stalls STALL_SECONDS without answering: the proxy's own timeout ends each request (504) before that
    proxy = VLLMProxy(stub_url, "base", None, metrics, max_model_len=64, timeout=STALL_SECONDS - 0.5, max_batch=1)
    proxy.scheduler.port = 9  # the scrape fails: only the proxy's own count is left
    set_serving(app, proxy, None)
    calls = [threading.Thread(target=app.test_client().post, args=("/v1/completions",),
                              kwargs={"json": {"model": "base", "prompt": "fault:stall"}}) for _ in range(3)]
    for t in calls:
        t.start()
    deadline = time.time() + STALL_SECONDS - 1
    while proxy.stats().waiting < 2 and time.time() < deadline:
        time.sleep(0.05)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert "tunestack_requests_queued 2.0" in text and "tunestack_requests_running 1.0" in text, text
    for t in calls:
        t.join(timeout=30)
    StubVLLM.seen.pop("fault:stall")  # the 504 test counts its own
    assert proxy.stats() == EngineStats(running=0, waiting=0)


def test_vllm_silent_past_the_timeout_is_a_504(stub_url):
    c, m = _client(stub_url, timeout=0.5)
    r = c.post("/v1/completions", json={"model": "base", "prompt": "fault:stall"})
    assert r.status_code == 504 and r.json["error"]["code"] == "upstream_timeout"
    assert StubVLLM.seen["fault:stall"] == 1, "a timed-out POST must not be sent again"
    assert _count(m, "base", "504") == 1 and m.registry.get_sample_value("tunestack_requests_in_flight") == 0


def _events(r) -> list[str]:
    return [line for line in r.get_data(as_text=True).split("\n\n") if line]


def test_stream_stalled_mid_answer_ends_with_an_error_event(stub_url):
    c, m = _client(stub_url, timeout=0.5)
    r = c.post("/v1/completions", json={"model": "base", "prompt": "fault:stall-mid-stream", "stream": True})
    events = _events(r)
    assert len(events) == 3 and events[-1] == "data: [DONE]", events
    assert json.loads(events[1][6:])["error"]["code"] == "upstream_timeout"
    assert _count(m, "base", "504") == 1 and _count(m, "base", "200") is None
    assert m.registry.get_sample_value("tunestack_requests_in_flight") == 0


def test_stream_cut_before_done_ends_with_an_error_event(stub_url):
    c, m = _client(stub_url)
    r = c.post("/v1/completions", json={"model": "base", "prompt": "fault:cut-stream", "stream": True})
    events = _events(r)
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "upstream_error"
    assert _count(m, "base", "502") == 1 and m.registry.get_sample_value("tunestack_requests_in_flight") == 0
    # the connection is not reused half-read: the next request on this thread is answered normally
    assert c.post("/v1/completions", json={"model": "base", "prompt": "a"}).data == WHOLE


def test_plain_text_500_becomes_an_openai_error(stub_url):
    c, m = _client(stub_url)
    r = c.post("/v1/completions", json={"model": "base", "prompt": "fault:plain-500"})
    assert r.status_code == 500 and r.json["error"]["message"] == "vLLM: Internal Server Error"
    assert _count(m, "base", "500") == 1 and m.registry.get_sample_value("tunestack_requests_in_flight") == 0


def test_vllm_closing_a_fresh_connection_is_a_503_sent_once(stub_url):
    """Only a kept-alive connection vLLM closed while idle is retried: a fresh one may have run the request."""
    c, m = _client(stub_url)
    r = c.post("/v1/completions", json={"model": "base", "prompt": "fault:drop"})
    assert r.status_code == 503 and r.json["error"]["code"] == "upstream_unavailable"
    assert StubVLLM.seen["fault:drop"] == 1
    assert m.registry.get_sample_value("tunestack_requests_in_flight") == 0


def test_models_and_context_check_with_vllm_down_are_503s():
    c, _ = _client("http://127.0.0.1:9")
    r = c.get("/v1/models")
    assert r.status_code == 503 and r.json["error"]["code"] == "upstream_unavailable"
    r = c.post("/v1/completions", json={"model": "base", "prompt": "w " * 40, "max_tokens": 40})  # asks /tokenize
    assert r.status_code == 503 and r.json["error"]["code"] == "upstream_unavailable"
