"""The vLLM backend's proxy: OpenAI requests relayed to vLLM as raw bytes, per-adapter metrics on the way.

    client ──> app (gunicorn) ──> VLLMProxy ──keep-alive HTTP/1.1──> vLLM api_server (127.0.0.1)

The fast path reads the body once (for the model name, the context check and usage) and relays
vLLM's bytes untouched; a stream's body is rewritten only to ask vLLM for the usage chunk the
metrics need, which is then kept from a client that did not ask for it.

Under failure every request ends, as an OpenAI-style error: vLLM unreachable is a 503, silent past
the timeout a 504, broken off mid-answer a 502 (in a stream: an error event, then [DONE]).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any, Generator

from serve.registry_sync import AdapterSync
from serve.vllm.adapters import VLLMAdapters
from serve.openai.backend import JSONReply, RelayedStream, Reply, ServedModels, json_body
from serve.engines.base import EngineStats
from serve.errors import TYPES, APIError, bad_request
from serve.metrics import Metrics
from serve.openai.protocol import ChatCompletionRequest, CompletionRequest

Labels = tuple[str, str]  # (model, adapter) metric labels
UPSTREAM_TIMEOUT = 600.0  # s of silence from vLLM before a request fails (504): a long unstreamed answer fits
STATS_TIMEOUT = 3.0  # s: a /metrics scrape must not wait long on a stuck vLLM (a saturated CPU vLLM took > 1 s)
STATS_TTL = 1.0  # s a reading of vLLM's queue is reused: Prometheus and KEDA poll every few seconds
STATS_STALE = 15.0  # s a good reading outlives failed scrapes: a busy vLLM must not read as an empty queue
# vLLM's scheduler gauges (vllm/v1/metrics/loggers.py), as EngineStats fields
VLLM_GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting"}
UPSTREAM_ERRORS = (http.client.HTTPException, OSError)  # http.client's failures (TimeoutError is an OSError)


class _Upstream:
    """Keep-alive HTTP/1.1 connections to vLLM, one per proxy thread (http.client: ~10x less work than httpx)."""

    def __init__(self, base_url: str, timeout: float = UPSTREAM_TIMEOUT):
        hostport = base_url.split("//", 1)[1]
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self.timeout = timeout
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
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
        """One exchange. Retried once only when a kept-alive connection had been closed by vLLM meanwhile:
        never after a timeout or on a fresh connection, where vLLM may be running the request already."""
        reused = getattr(self._local, "conn", None) is not None
        try:
            return self._exchange(method, path, body)
        except TimeoutError:
            raise
        except UPSTREAM_ERRORS:
            if not reused:
                raise
        return self._exchange(method, path, body)

    def _exchange(self, method: str, path: str, body: bytes | None) -> http.client.HTTPResponse:
        try:
            conn = self._conn()
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            return conn.getresponse()
        except BaseException:
            self.drop()
            raise


class _SchedulerGauges:
    """vLLM's own running and waiting counts, from its /metrics: the queue KEDA scales on.

    Read with a short timeout and reused for STATS_TTL, so scrapes cost vLLM little and never hang.
    A scrape that fails keeps the last good reading for STATS_STALE: vLLM answers /metrics slowly when
    it is saturated, which is when the queue matters most to the autoscaler. Zeros after that (vLLM is
    down, and its /ready is 503 then)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self._at = float("-inf")  # when the last scrape was tried
        self._good_at = float("-inf")  # when the last scrape succeeded
        self._last = EngineStats()

    def read(self) -> EngineStats:
        with self._lock:  # concurrent scrapes share one reading
            now = time.monotonic()
            if now - self._at >= STATS_TTL:
                self._at = now
                fresh = self._scrape()
                if fresh is not None:
                    self._last, self._good_at = fresh, time.monotonic()
                elif now - self._good_at > STATS_STALE:
                    self._last = EngineStats()
            return self._last

    def _scrape(self) -> EngineStats | None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=STATS_TIMEOUT)
        try:
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            text = r.read().decode("utf-8", "replace")
        except UPSTREAM_ERRORS:
            return None
        finally:
            conn.close()
        return scheduler_counts(text) if r.status == 200 else None


def scheduler_counts(prometheus_text: str) -> EngineStats:
    """vLLM's running and waiting gauges, summed over engines (each data-parallel rank reports its own)."""
    sums = {"running": 0.0, "waiting": 0.0}
    for line in prometheus_text.splitlines():
        key = VLLM_GAUGES.get(line.split("{", 1)[0].split(" ", 1)[0])
        if key is not None:
            try:
                sums[key] += float(line.rsplit("}", 1)[-1].split()[0])
            except (ValueError, IndexError):
                continue
    return EngineStats(running=int(sums["running"]), waiting=int(sums["waiting"]))


def upstream_error(e: BaseException, timeout: float, answered: bool) -> APIError:
    """What a failure talking to vLLM is for the client: 504 silent too long, 502 broken off, 503 unreachable."""
    if isinstance(e, TimeoutError):
        return APIError(504, f"vLLM did not answer within {timeout:g} s", code="upstream_timeout")
    if answered:
        return APIError(502, f"vLLM broke off its answer ({type(e).__name__})", code="upstream_error")
    return APIError(503, f"vLLM is unavailable: {e}", code="upstream_unavailable")


class VLLMProxy:
    """The Backend in front of vLLM: forwards OpenAI requests, recording per-adapter metrics on the way."""

    def __init__(self, base_url: str, served_name: str, sync: AdapterSync | None, metrics: Metrics,
                 max_model_len: int = 2048, timeout: float = UPSTREAM_TIMEOUT, max_batch: int = 32,
                 adapters: VLLMAdapters | None = None):
        """adapters: loads a request's adapter into vLLM first (None: every name the sync serves is in vLLM)."""
        self.base_url = base_url
        self.adapters = adapters
        self.max_batch = max_batch  # vLLM's --max-num-seqs: what this proxy has in vLLM beyond it is waiting
        self.max_model_len = max_model_len
        self.model_name = served_name
        self.metrics = metrics
        self.served = ServedModels(served_name, sync)
        self.up = _Upstream(base_url, timeout)
        self.scheduler = _SchedulerGauges(self.up.host, self.up.port)
        self._forwarded = 0  # requests this proxy has in vLLM: between in_flight.inc and _finish
        self._forwarded_lock = threading.Lock()

    def is_served(self, model: object) -> bool:
        return self.served.is_served(model)

    def stats(self) -> EngineStats:
        """vLLM's own counts, floored by what this proxy knows without asking: of the requests it has in
        vLLM, at most max_batch run and the rest wait. A saturated vLLM can be too slow to answer its
        /metrics (CI saw the queue read 0 through a whole burst); the queue KEDA scales on must not."""
        seen = self.scheduler.read()
        with self._forwarded_lock:
            n = self._forwarded
        return EngineStats(running=max(seen.running, min(n, self.max_batch)),
                           waiting=max(seen.waiting, n - self.max_batch))

    def _forwarding(self, step: int) -> None:
        with self._forwarded_lock:
            self._forwarded += step

    def models(self) -> JSONReply:
        """vLLM's card for its base, then one per servable adapter, held by vLLM or not, with its registry
        evidence (extra fields); vLLM lists only the adapters it holds."""
        status, raw = self._get_whole("GET", "/v1/models")
        sync = self.served.sync
        body = _json_or_none(raw)
        if status != 200 or sync is None or not isinstance(body, dict) or not isinstance(body.get("data"), list):
            return JSONReply(raw if status == 200 else _openai_error(status, raw), status)
        bases = [c for c in body["data"] if isinstance(c, dict) and not c.get("parent")]
        like = bases[0] if bases else {"object": "model"}
        ev = sync.evidence()
        body["data"] = bases + [{**like, "id": n, "root": n, "parent": self.model_name, "max_model_len": None,
                                 **ev.get(n, {})} for n in sync.loaded()]
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
        # the same rules as the Flask backend and /openapi.json (a missing model, a wrong type: 400 here);
        # fields the protocol does not know pass through to vLLM untouched
        try:
            (ChatCompletionRequest if path.endswith("chat/completions") else CompletionRequest).parse(body)
        except APIError as e:
            self.metrics.record_request(self.served.labels(body.get("model")), e.status, t0)
            raise
        if (fitted := _fit_for_vllm(body, self.served.canonical(body.get("model")))) is not None:
            body, raw = fitted, json.dumps(fitted).encode()
        self._check_context(path, body)
        try:
            adapter = self.served.adapter(body.get("model"))  # 404 for a name not served, before vLLM
            if adapter is not None and self.adapters is not None:
                self.adapters.acquire(adapter)  # released by _finish, through the adapter label
        except APIError as e:
            self.metrics.record_request(self.served.labels(body.get("model")), e.status, t0)
            raise
        labels = (adapter, adapter) if adapter is not None else (self.model_name, "")
        stream = body.get("stream") is True
        wants_usage = not stream or _include_usage(body)
        if not wants_usage:
            raw = _asking_for_usage(body)
        self.metrics.in_flight.inc()  # decremented by _finish: once the answer is read, failed or the stream closed
        self._forwarding(1)
        before = time.perf_counter() - t0
        up = self._send(path, raw, labels, t0)
        if not stream or up.status != 200:
            return self._whole(up, labels, t0, before)
        self.metrics.proxy_overhead.observe(before)
        return RelayedStream(self._relay(up, labels, t0, wants_usage))

    def _finish(self, labels: Labels, status: int, t0: float, usage: dict | None = None,
                first: float | None = None) -> None:
        """The one place a forwarded request ends: recorded, out of the in-flight gauge, its adapter unpinned."""
        if labels[1] and self.adapters is not None:
            self.adapters.release(labels[1])
        self.metrics.record_request(labels, status, t0, usage, first)
        self.metrics.in_flight.dec()
        self._forwarding(-1)

    def _send(self, path: str, raw: bytes, labels: Labels, t0: float) -> http.client.HTTPResponse:
        try:
            return self.up.request("POST", path, raw)
        except UPSTREAM_ERRORS as e:
            err = upstream_error(e, self.up.timeout, answered=False)
            self._finish(labels, err.status, t0)
            raise err from None

    def _whole(self, up: http.client.HTTPResponse, labels: Labels, t0: float, before: float) -> JSONReply:
        """A whole answer (any non-streamed one, and every error): relayed as it came, its usage recorded."""
        t1 = time.perf_counter()
        try:
            data = up.read()
        except UPSTREAM_ERRORS as e:
            self.up.drop()
            err = upstream_error(e, self.up.timeout, answered=True)
            self._finish(labels, err.status, t0)
            raise err from None
        self._finish(labels, up.status, t0, _usage(data) if up.status == 200 else None)
        self.metrics.proxy_overhead.observe(before + time.perf_counter() - t1)
        if up.status != 200:
            return JSONReply(_openai_error(up.status, data), up.status)
        return JSONReply(data, up.status, up.getheader("content-type", "application/json"))

    def _get_whole(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """(status, body) of a small exchange with vLLM (model list, token count); 503/504 when it fails."""
        try:
            r = self.up.request(method, path, body)
            return r.status, r.read()
        except UPSTREAM_ERRORS as e:
            self.up.drop()
            raise upstream_error(e, self.up.timeout, answered=False) from None

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
        count = self._token_count(self.model_name, key, text)  # the base's tokenizer: an adapter may not be in vLLM yet
        if count is not None and count + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{count + max_tokens} tokens ({count} in the prompt, {max_tokens} in the completion).",
                "max_tokens", "context_length_exceeded")

    def _token_count(self, model: Any, key: str, text: Any) -> int | None:
        """vLLM's token count of the prompt or messages; None when vLLM refuses (it reports that itself)."""
        status, data = self._get_whole("POST", "/tokenize", json.dumps({"model": model, key: text}).encode())
        obj = _json_or_none(data) if status == 200 else None
        return obj.get("count", 0) if isinstance(obj, dict) else None

    def _relay(self, up: http.client.HTTPResponse, labels: Labels, t0: float,
               wants_usage: bool) -> Generator[bytes, None, None]:
        """vLLM's SSE lines as they come, noting the first token and the usage; the client leaving is a 499.

        vLLM failing mid-stream (timeout, reset, a stream cut before [DONE]) ends it with an error event."""
        first, usage, status, finished, done = None, None, 200, False, False
        try:
            while raw := up.readline():
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    continue
                done = done or line == "data: [DONE]"
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
            if not done:
                raise http.client.IncompleteRead(b"")  # vLLM closed the stream without [DONE]: it failed
        except GeneratorExit:
            status = 499  # client left: closing the upstream connection makes vLLM abort the request
            raise
        except UPSTREAM_ERRORS as e:
            err = upstream_error(e, self.up.timeout, answered=True)
            status, finished = err.status, False
            yield f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n".encode()
        finally:
            if not finished:
                self.up.drop()  # the connection is mid-answer: close it (vLLM aborts) rather than reuse it
            up.close()
            self._finish(labels, status, t0, usage if status == 200 else None, first)
def _fit_for_vllm(body: dict, model: object = None) -> dict | None:
    """The body with what the API accepts but vLLM refuses made vLLM's way (None: nothing to change):
    nulls are "not given" in OpenAI's API; stream_options without a stream and empty stop strings are
    ignored, top_p 0 keeps the top token only, as on the Flask backend, and a fine-tuning job's
    `ft:` name becomes the adapter name vLLM knows (`model`, from ServedModels.canonical)."""
    out = {k: v for k, v in body.items() if v is not None}
    if model is not None and model != out.get("model"):
        out["model"] = model
    if out.get("stream") is not True:
        out.pop("stream_options", None)
    stop = out.get("stop")
    if stop == "" or (isinstance(stop, list) and "" in stop):
        kept = [t for t in ([stop] if isinstance(stop, str) else stop) if t]
        out.pop("stop")
        if kept:
            out["stop"] = kept
    if out.get("top_p") == 0:
        out["top_p"] = 1e-9  # vLLM wants (0, 1]: the smallest nucleus is the top token alone
    return None if out == body else out


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


def _openai_error(status: int, data: bytes) -> bytes:
    """vLLM's error in OpenAI's shape: its message and param kept, the type ours for the status, `code` a
    string or null (vLLM puts the status number there); a plain-text 500 from its HTTP layer made so too."""
    obj = _json_or_none(data)
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        err = obj["error"]
        code, param = err.get("code"), err.get("param")
        if "maximum context length" in str(err.get("message")):  # the code the Flask backend gives the same refusal
            code = "context_length_exceeded"
        return json.dumps({"error": {"message": str(err.get("message", "")), "type": TYPES.get(status, "server_error"),
                                     "param": param if isinstance(param, str) else None,
                                     "code": code if isinstance(code, str) else None}}).encode()
    text = data.decode("utf-8", "replace").strip()[:300] or http.client.responses.get(status, "error")
    return json.dumps(APIError(status, f"vLLM: {text}").body()).encode()
