"""Flask app factory: HTTP only. Auth, errors, routes, and backend replies as HTTP responses (SSE framing).

What a request means is the backend's business (backend.py: OpenAIServing or VLLMProxy); the app
routes raw bodies to it and frames what comes back.
"""

from __future__ import annotations

import hmac
import json
import logging
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serve.adapters import AdapterSync
from serve.backend import Backend, EventStream, JSONReply, RelayedStream, Reply
from serve.errors import APIError, bad_request
from serve.metrics import Metrics
from serve.openapi import openapi_spec
from serve.settings import Settings

log = logging.getLogger("serve.app")
PLAYGROUND = Path(__file__).with_name("playground.html")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


@dataclass
class AppState:
    """The backend and its adapter sync: None until the model has loaded (set_serving)."""

    backend: Backend | None = None
    sync: AdapterSync | None = None

    def ready_backend(self) -> Backend:
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
    app = Flask("tunestack")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.url_map.merge_slashes = False  # "//etc/passwd" must reach the name check, not redirect
    state = AppState(serving, sync)
    app.extensions["tunestack"] = state
    _error_handlers(app, settings.max_body_bytes)
    app.before_request(_authenticator(settings))
    _probe_routes(app, state, metrics)
    _api_routes(app, state)
    _admin_routes(app, state)
    return app


def set_serving(app: Flask, serving: Backend, sync: AdapterSync | None) -> None:
    state: AppState = app.extensions["tunestack"]
    state.sync, state.backend = sync, serving  # sync first: a ready backend always has its adapters


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
        return json_response(APIError(e.code or 500, e.description or e.name).body(), e.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error")
        return json_response({"error": {"message": "internal error", "type": "server_error", "param": None,
                                        "code": None}}, 500)


def _bearer_ok(expected: str) -> bool:
    got = request.headers.get("Authorization", "")
    token = got[7:] if got.startswith("Bearer ") else ""
    return hmac.compare_digest(token.encode(), expected.encode())  # constant time


def _authenticator(settings: Settings) -> Callable[[], None]:
    """/admin needs the admin key (and is off without one); /v1 needs the API key when one is set."""
    def check() -> None:
        p = request.path
        if p.startswith("/admin"):
            if not settings.admin_key:
                raise APIError(404, "admin API is off (set SERVE_ADMIN_KEY)")
            if not _bearer_ok(settings.admin_key):
                raise APIError(401, "invalid or missing admin key", code="invalid_api_key")
        elif p.startswith("/v1") and settings.api_key and not _bearer_ok(settings.api_key):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
    return check


# -- routes ---------------------------------------------------------------------------------------
def _probe_routes(app: Flask, state: AppState, metrics: Metrics) -> None:
    """Open paths: liveness, readiness, Prometheus metrics, the OpenAPI description, the playground."""
    @app.get("/health")
    def health():
        return json_response({"status": "ok"})

    @app.get("/ready")
    def ready():
        if state.backend is None:
            return json_response({"status": "loading"}, 503)
        return json_response({"status": "ready", "adapters": state.sync.loaded() if state.sync else []})

    @app.get("/metrics")
    def prom():
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
