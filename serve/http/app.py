"""Flask app factory: HTTP only. Auth, errors, routes, and backend replies as HTTP responses (SSE framing).

What a request means is the backend's business (backend.py: OpenAIServing or VLLMProxy); the app
routes raw bodies to it and frames what comes back.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import socket
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, RequestTimeout
from werkzeug.wsgi import ClosingIterator

from serve.adapters import AdapterSync
from serve import finetune_api
from serve.backend import Backend, EventStream, JSONReply, RelayedStream, Reply, json_body
from serve.errors import APIError, bad_request
from serve.metrics import Metrics
from serve.openapi import openapi_spec
from serve.settings import Settings

log = logging.getLogger("serve.app")
PLAYGROUND = Path(__file__).with_name("playground.html")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
# Open without a key: probes (kubelet), the Prometheus scrape, the API description, the playground page
# (it asks the user for the key). Every other path needs a key when one is set: a new route is closed by default.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/"})


class Drain:
    """HTTP requests in progress, and the draining flag that SIGTERM sets (server.DrainingWorker).

    While draining, /ready is 503 and new API requests get 503 "draining"; the worker stops once no
    request is in progress or after `seconds`. Any process serving this app can drive it: begin(), then
    wait_idle(seconds), then stop."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.draining = False  # a plain attribute: a signal handler may set it without taking a lock
        self._active = 0
        self._idle = threading.Condition()

    def begin(self) -> None:
        self.draining = True

    @property
    def active(self) -> int:
        return self._active

    def enter(self) -> Callable[[], None]:
        """Count a request in; the returned release counts it out (once, however often it is called)."""
        with self._idle:
            self._active += 1
        done = []

        def release() -> None:
            with self._idle:
                if not done:
                    done.append(True)
                    self._active -= 1
                    self._idle.notify_all()
        return release

    def wait_idle(self, timeout: float) -> bool:
        """True once no request is in progress; False if `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)


class _Watchdog:
    """One daemon thread that calls each watched callback at its deadline, unless cancelled first."""

    def __init__(self) -> None:
        self._due: dict[int, tuple[float, Callable[[], None]]] = {}
        self._keys = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None  # started on first use: in gunicorn's worker, after fork

    def watch(self, deadline: float, callback: Callable[[], None]) -> int:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="body-deadline", daemon=True)
                self._thread.start()
            key = next(self._keys)
            self._due[key] = (deadline, callback)
            self._cv.notify()
            return key

    def cancel(self, key: int) -> None:
        with self._cv:
            self._due.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._cv:
                now = time.monotonic()
                fired = [self._due.pop(k)[1] for k, (d, _) in list(self._due.items()) if d <= now]
                if not fired:  # at most one entry per HTTP thread: a scan is cheap
                    self._cv.wait(min((d for d, _ in self._due.values()), default=now + 60) - now)
            for callback in fired:
                callback()


BODY_WATCHDOG = _Watchdog()


class DeadlineInput:
    """wsgi.input with one deadline for the whole body (then 408) and a size limit (then 413).

    gunicorn reads a body from a blocking socket with no timeout, and one read() loops over many recv()s,
    so neither a socket timeout nor a check between reads stops a client that sends its headers and then
    trickles the body (or stops). At the deadline the watchdog shuts the socket's read side: the blocked
    recv() returns, and the request is answered 408 on the still open write side.

    The limit is checked here too: werkzeug stops a chunked body (no Content-Length) at the limit
    without an error, so a larger one would be cut silently and parsed as if it were whole."""

    def __init__(self, stream: Any, sock: socket.socket | None, seconds: float, length: int | None, limit: int):
        self._stream, self._sock, self._seconds, self._length, self._limit = stream, sock, seconds, length, limit
        self._deadline = time.monotonic() + seconds
        self._got = 0
        self._lock = threading.Lock()
        self._expired = self._done = False
        self._watch: int | None = None

    def read(self, *size: int) -> bytes:
        return self._bounded(self._stream.read, *size)

    def readline(self, *size: int) -> bytes:
        return self._bounded(self._stream.readline, *size)

    def finish(self) -> None:
        """The body is read (or the response is done): stop watching it."""
        with self._lock:
            self._done = True
            if self._watch is not None:
                BODY_WATCHDOG.cancel(self._watch)

    def _bounded(self, read: Callable[..., bytes], *size: int) -> bytes:
        if self._expired or time.monotonic() >= self._deadline:
            raise self._timeout()
        with self._lock:
            if self._sock is not None and self._watch is None and not self._done:
                self._watch = BODY_WATCHDOG.watch(self._deadline, self._expire)
        try:
            data = read(*size)
        except Exception:
            if self._expired:
                raise self._timeout() from None
            raise
        if self._expired:
            raise self._timeout()
        self._got += len(data)
        if self._got > self._limit:
            self.finish()
            raise RequestEntityTooLarge()
        if not data or (self._length is not None and self._got >= self._length):
            self.finish()
        return data

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._expired = True
            try:
                self._sock.shutdown(socket.SHUT_RD)  # type: ignore[union-attr]
            except OSError:  # the client is already gone
                pass

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(f"request body not received within {self._seconds:g} s")


@dataclass
class AppState:
    """The backend and its adapter sync (None until the model has loaded), a load failure, the drain."""

    backend: Backend | None = None
    sync: AdapterSync | None = None
    failed: str | None = None  # why the model could not be loaded: /health and /ready say it (503)
    drain: Drain = field(default_factory=lambda: Drain(0.0))

    def ready_backend(self) -> Backend:
        if self.failed is not None:
            raise APIError(503, self.failed, code="load_failed")
        if self.backend is None:
            raise APIError(503, "model is loading; retry shortly", code="not_ready")
        return self.backend

    def ready_sync(self) -> AdapterSync:
        if self.sync is None:
            raise APIError(503, "not ready", code="not_ready")
        return self.sync


def build_app(settings: Settings, serving: Backend | None, metrics: Metrics,
              sync: AdapterSync | None = None) -> Flask:
    """`serving` may be None while the engine loads: /ready and /v1/* answer 503 until set_serving()."""
    app = Flask("tunestack", static_folder=None)  # no /static route serving whatever the working directory holds
    # one byte over: a chunked body larger than the limit must reach DeadlineInput's check (413), not be cut at it
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_body_bytes, settings.max_upload_bytes) + 1
    app.url_map.merge_slashes = False  # "//etc/passwd" must reach the name check, not redirect
    state = AppState(serving, sync, drain=Drain(settings.drain_seconds))
    app.extensions["tunestack"] = state
    app.wsgi_app = _counted_with_deadline(app.wsgi_app, state.drain, settings)  # type: ignore[method-assign]
    _error_handlers(app, settings.max_body_bytes)
    app.before_request(_authenticator(settings, state.drain))
    _probe_routes(app, state, metrics)
    _api_routes(app, state)
    _admin_routes(app, state)
    submit = None
    if settings.finetune_worker == "k8s":
        from serve.k8s_runner import K8sRunner

        submit = K8sRunner(settings.finetune_job_template, settings.finetune_namespace).submit
    finetune_api.routes(app, finetune_api.FineTuneAPI(settings.registry, lambda: state.ready_backend().model_name,
                                                      settings.max_upload_bytes, settings.api_key, submit,
                                                      settings.finetune_dir or None),
                        json_body, json_response)
    return app


def set_serving(app: Flask, serving: Backend, sync: AdapterSync | None) -> None:
    state: AppState = app.extensions["tunestack"]
    state.sync, state.backend = sync, serving  # sync first: a ready backend always has its adapters


def set_failed(app: Flask, reason: str) -> None:
    """The model will never load: /health and /ready answer 503 with `reason` (the process exits next)."""
    app.extensions["tunestack"].failed = reason


def drain_of(app: Any) -> Drain | None:
    """The Drain of an app build_app made (None for any other WSGI app)."""
    state = getattr(app, "extensions", {}).get("tunestack")
    return state.drain if isinstance(state, AppState) else None


def _counted_with_deadline(wsgi_app: Callable, drain: Drain, settings: Settings) -> Callable:
    """WSGI middleware: every request counts as in progress until its response is closed (streams
    included); its body must arrive within body_timeout and fit max_body_bytes."""
    def counted(environ: dict, start_response: Callable) -> Any:
        length = environ.get("CONTENT_LENGTH")
        upload = environ.get("PATH_INFO") == "/v1/files" and environ.get("REQUEST_METHOD") == "POST"
        body_in = DeadlineInput(environ["wsgi.input"], environ.get("gunicorn.socket"),
                                settings.upload_timeout if upload else settings.body_timeout,
                                int(length) if length and length.isdigit() else None,
                                settings.max_upload_bytes if upload else settings.max_body_bytes)
        environ["wsgi.input"] = body_in
        release = drain.enter()
        try:
            body = wsgi_app(environ, start_response)
        except BaseException:
            release()
            body_in.finish()
            raise
        return ClosingIterator(body, [release, body_in.finish])  # closed by the server once sent or abandoned
    return counted


# -- replies as responses -------------------------------------------------------------------------
def json_response(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj), status=status, mimetype="application/json")


def to_response(reply: Reply) -> Response:
    if isinstance(reply, JSONReply):
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body)
        return Response(body, reply.status, mimetype=reply.mimetype)
    if isinstance(reply, EventStream):
        return Response(sse_frames(reply.events), mimetype="text/event-stream", headers=SSE_HEADERS)
    if isinstance(reply, RelayedStream):
        return Response(reply.chunks, mimetype="text/event-stream", headers=SSE_HEADERS)
    raise TypeError(f"not a backend reply: {type(reply).__name__}")


def sse_frames(events: Generator[dict[str, Any], None, None]) -> Iterator[str]:
    """Each event as an SSE `data:` line, then [DONE]. Closing this (client gone) closes the events."""
    with closing(events):
        for obj in events:
            yield f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
    yield "data: [DONE]\n\n"


# -- errors and auth ----------------------------------------------------------------------------
def _error_handlers(app: Flask, max_body_bytes: int) -> None:
    @app.errorhandler(APIError)
    def _api_error(e: APIError):
        return json_response(e.body(), e.status)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(e):
        return json_response(APIError(413, f"request body exceeds {max_body_bytes} bytes").body(), 413)

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        r = json_response(APIError(e.code or 500, e.description or e.name).body(), e.code or 500)
        for k, v in e.get_headers():  # e.g. Allow on a 405 (RFC 9110); the JSON body replaces werkzeug's HTML
            if k.lower() != "content-type":
                r.headers[k] = v
        return r

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error")
        return json_response({"error": {"message": "internal error", "type": "server_error", "param": None,
                                        "code": None}}, 500)


def _bearer_ok(expected: str) -> bool:
    got = request.headers.get("Authorization", "")
    token = got[7:] if got.startswith("Bearer ") else ""
    return hmac.compare_digest(token.encode(), expected.encode())  # constant time


def _authenticator(settings: Settings, drain: Drain) -> Callable[[], None]:
    """/admin needs the admin key (and is off without one); every path but OPEN_PATHS needs the API key
    when one is set. Then, while draining, new requests get 503 so clients retry on another replica."""
    def check() -> None:
        p = request.path
        if p in OPEN_PATHS:
            return
        if p.startswith("/admin"):
            if not settings.admin_key:
                raise APIError(404, "admin API is off (set SERVE_ADMIN_KEY)")
            if not _bearer_ok(settings.admin_key):
                raise APIError(401, "invalid or missing admin key", code="invalid_api_key")
        elif settings.api_key and not _bearer_ok(settings.api_key):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
        if drain.draining:
            raise APIError(503, "server is shutting down; retry on another replica", code="draining")
    return check


# -- routes ---------------------------------------------------------------------------------------
def _probe_routes(app: Flask, state: AppState, metrics: Metrics) -> None:
    """Open paths: liveness, readiness, Prometheus metrics, the OpenAPI description, the playground."""
    @app.get("/health")
    def health():
        if state.failed is not None:  # alive, but never going to serve: say so, the process is exiting
            return json_response({"status": "failed", "reason": state.failed}, 503)
        return json_response({"status": "ok"})

    @app.get("/ready")
    def ready():
        if state.failed is not None:
            return json_response({"status": "failed", "reason": state.failed}, 503)
        if state.drain.draining:  # at once, so Kubernetes takes the pod out of the Service's endpoints
            return json_response({"status": "draining"}, 503)
        if state.backend is None:
            return json_response({"status": "loading"}, 503)
        return json_response({"status": "ready", "adapters": state.sync.loaded() if state.sync else []})

    @app.get("/metrics")
    def prom():
        metrics.http_active.set(state.drain.active - 1)  # this scrape is one of them
        if state.backend is not None:
            st = state.backend.stats()
            metrics.running.set(st.running)
            metrics.queued.set(st.waiting)
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json")
    def openapi():
        return json_response(openapi_spec())

    @app.get("/")
    def playground():
        return Response(PLAYGROUND.read_text(encoding="utf-8"), mimetype="text/html")


def _api_routes(app: Flask, state: AppState) -> None:
    """The OpenAI API: raw bodies go to the backend, which parses, checks and records them."""
    @app.get("/v1/models")
    def models():
        return to_response(state.ready_backend().models())

    @app.post("/v1/completions")
    def completions():
        return to_response(state.ready_backend().completions(request.get_data(cache=False)))

    @app.post("/v1/chat/completions")
    def chat_completions():
        return to_response(state.ready_backend().chat_completions(request.get_data(cache=False)))


def _admin_routes(app: Flask, state: AppState) -> None:
    """Adapter states, load and unload; names come only from the registry, never paths."""
    @app.get("/admin/adapters")
    def admin_list():
        return json_response({"adapters": {n: s.public() for n, s in sorted(state.ready_sync().states.items())}})

    @app.post("/admin/adapters/<path:name>/load")
    def admin_load(name: str):
        sync = state.ready_sync()
        st = sync.load(_registry_name(sync, name))
        return json_response({"name": name, **st.public()}, 200 if st.state == "loaded" else 422)

    @app.post("/admin/adapters/<path:name>/unload")
    def admin_unload(name: str):
        sync = state.ready_sync()
        sync.unload(_registry_name(sync, name), state="disabled")
        return json_response({"name": name, "state": "disabled"})


def _registry_name(sync: AdapterSync, name: str) -> str:
    """`name` if it is a valid registry name of a published adapter; 400 or 404 otherwise."""
    from artifacts import RegistryError, split_ref

    try:
        split_ref(name)
    except RegistryError as e:
        raise bad_request(str(e), "name") from None
    if name not in sync.registry.names("adapters"):
        raise APIError(404, f"adapter {name!r} is not in the registry", "name")
    return name
