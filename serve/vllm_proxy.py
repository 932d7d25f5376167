"""The vLLM backend's proxy: OpenAI requests relayed to vLLM as raw bytes, per-adapter metrics on the way.

    client ──> app (gunicorn) ──> VLLMProxy ──keep-alive HTTP/1.1──> vLLM api_server (127.0.0.1)

The fast path reads the body once (for the model name, the context check and usage) and relays
vLLM's bytes untouched; a stream's body is rewritten only to ask vLLM for the usage chunk the
metrics need, which is then kept from a client that did not ask for it.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any, Generator

from serve.adapters import AdapterSync
from serve.backend import JSONReply, RelayedStream, Reply, ServedModels, json_body
from serve.engines.base import EngineStats
from serve.errors import APIError, bad_request
from serve.metrics import Metrics

Labels = tuple[str, str]  # (model, adapter) metric labels


class _Upstream:
    """Keep-alive HTTP/1.1 connections to vLLM, one per proxy thread (http.client: ~10x less work than httpx)."""

    def __init__(self, base_url: str):
        hostport = base_url.split("//", 1)[1]
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn = conn
        return conn

    def drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, path: str, body: bytes | None = None) -> http.client.HTTPResponse:
        for attempt in (0, 1):  # a keep-alive connection vLLM closed meanwhile: reconnect once
            try:
                conn = self._conn()
                conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
                return conn.getresponse()
            except (http.client.HTTPException, OSError):
                self.drop()
                if attempt:
                    raise
        raise AssertionError("unreachable")


class VLLMProxy:
    """The Backend in front of vLLM: forwards OpenAI requests, recording per-adapter metrics on the way."""

    def __init__(self, base_url: str, served_name: str, sync: AdapterSync | None, metrics: Metrics,
                 max_model_len: int = 2048):
        self.base_url = base_url
        self.max_model_len = max_model_len
        self.model_name = served_name
        self.metrics = metrics
        self.served = ServedModels(served_name, sync)
        self.up = _Upstream(base_url)

    def is_served(self, model: object) -> bool:
        return self.served.is_served(model)

    def stats(self) -> EngineStats:
        return EngineStats()  # vLLM's scheduler is not visible from here: it exports its own metrics

    def models(self) -> JSONReply:
        """vLLM's own list, each adapter entry with its registry evidence added (extra fields)."""
        r = self.up.request("GET", "/v1/models")
        raw = r.read()
        sync = self.served.sync
        if r.status != 200 or sync is None:
            return JSONReply(raw, r.status)
        body, ev = json.loads(raw), sync.evidence()
        for card in body.get("data", []):
            card.update(ev.get(card.get("id"), {}))
        return JSONReply(body, 200)

    def completions(self, raw_body: bytes) -> Reply:
        return self.forward("/v1/completions", raw_body)

    def chat_completions(self, raw_body: bytes) -> Reply:
        return self.forward("/v1/chat/completions", raw_body)

    # -- forwarding ------------------------------------------------------------------
    def forward(self, path: str, raw: bytes) -> Reply:
        t0 = time.perf_counter()
        body = json_body(raw)
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        labels = self.served.labels(body.get("model"))
        self._check_context(path, body)
        stream = body.get("stream") is True
        wants_usage = not stream or _include_usage(body)
        if not wants_usage:
            raw = _asking_for_usage(body)
        self.metrics.in_flight.inc()  # decremented once the answer is read or the stream closed
        before = time.perf_counter() - t0
        up = self._send(path, raw, labels)
        if not stream or up.status != 200:
            return self._whole(up, labels, t0, before)
        self.metrics.proxy_overhead.observe(before)
        return RelayedStream(self._relay(up, labels, t0, wants_usage))

    def _send(self, path: str, raw: bytes, labels: Labels) -> http.client.HTTPResponse:
        try:
            return self.up.request("POST", path, raw)
        except (http.client.HTTPException, OSError) as e:
            self.metrics.in_flight.dec()
            self.metrics.record_request(labels, 503, 0.0)
            raise APIError(503, f"vLLM is unavailable: {e}", code="upstream_unavailable") from None

    def _whole(self, up: http.client.HTTPResponse, labels: Labels, t0: float, before: float) -> JSONReply:
        """A whole answer (any non-streamed one, and every error): relayed as it came, its usage recorded."""
        t1 = time.perf_counter()
        data = up.read()
        self.metrics.record_request(labels, up.status, t0, _usage(data) if up.status == 200 else None)
        self.metrics.in_flight.dec()
        self.metrics.proxy_overhead.observe(before + time.perf_counter() - t1)
        return JSONReply(data, up.status, up.getheader("content-type", "application/json"))

    def _check_context(self, path: str, body: dict) -> None:
        """400 for prompt + max_tokens beyond the context, as the Flask backend does (vLLM would clamp).

        Fast path without tokenising: UTF-8 bytes bound byte-level BPE token counts from above, so
        a request that fits by that bound is forwarded untouched; only near-limit ones ask /tokenize.
        """
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            return
        key = "messages" if "chat" in path else "prompt"
        text = body.get(key)
        bound = len(json.dumps(text, ensure_ascii=False).encode()) + 64  # + chat template tokens
        if max_tokens + bound <= self.max_model_len:
            return
        count = self._token_count(body.get("model"), key, text)
        if count is not None and count + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{count + max_tokens} tokens ({count} in the prompt, {max_tokens} in the completion).",
                "max_tokens", "context_length_exceeded")

    def _token_count(self, model: Any, key: str, text: Any) -> int | None:
        """vLLM's token count of the prompt or messages; None when vLLM refuses (it reports that itself)."""
        r = self.up.request("POST", "/tokenize", json.dumps({"model": model, key: text}).encode())
        data = r.read()
        return json.loads(data).get("count", 0) if r.status == 200 else None

    def _relay(self, up: http.client.HTTPResponse, labels: Labels, t0: float,
               wants_usage: bool) -> Generator[bytes, None, None]:
        """vLLM's SSE lines as they come, noting the first token and the usage; the client leaving is a 499."""
        first, usage, status, finished = None, None, 200, False
        try:
            while raw := up.readline():
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    continue
                if line.startswith("data: {"):
                    compact = line.replace(" ", "")
                    if first is None and '"choices":[{' in compact:
                        first = time.perf_counter()
                    if '"usage":{' in compact:
                        obj = _json_or_none(line[6:])
                        usage = (obj or {}).get("usage") or usage
                        if obj is not None and not wants_usage and not obj.get("choices"):
                            continue  # the usage chunk we asked for ourselves
                yield (line + "\n\n").encode()
            finished = True
        except GeneratorExit:
            status = 499  # client left: closing the upstream connection makes vLLM abort the request
            raise
        finally:
            if not finished:
                self.up.drop()
            self.metrics.record_request(labels, status, t0, usage, first)
            self.metrics.in_flight.dec()


def _include_usage(body: dict) -> bool:
    so = body.get("stream_options")
    return isinstance(so, dict) and bool(so.get("include_usage"))


def _asking_for_usage(body: dict) -> bytes:
    """The body re-serialised with stream_options.include_usage set: the metrics need the token counts."""
    so = body.get("stream_options")
    body["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
    return json.dumps(body).encode()


def _json_or_none(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _usage(data: bytes) -> dict | None:
    obj = _json_or_none(data)
    return obj.get("usage") if isinstance(obj, dict) else None
