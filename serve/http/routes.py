"""The routes: probes, the OpenAI API, the admin API; and backend replies as HTTP responses (SSE framing)."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Iterator

from flask import Flask, Response, request

from serve.errors import APIError, bad_request
from serve.http.auth import current_caller
from serve.http.openapi import openapi_spec
from serve.metrics import Metrics
from serve.openai.backend import EventStream, JSONReply, RelayedStream, Reply
from serve.registry_sync import AdapterSync

if TYPE_CHECKING:
    from serve.http.app import AppState

PLAYGROUND = Path(__file__).with_name("playground.html")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


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


# -- routes ---------------------------------------------------------------------------------------
def probe_routes(app: Flask, state: AppState, metrics: Metrics) -> None:
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
        if state.unhealthy is not None:  # out of the Service's endpoints until the engine answers again
            return json_response({"status": "unhealthy", "reason": state.unhealthy}, 503)
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


def api_routes(app: Flask, state: AppState) -> None:
    """The OpenAI API: raw bodies go to the backend, which parses, checks and records them."""
    @app.get("/v1/me")
    def me():
        """What the caller's key may do: the console hides the rest."""
        caller = current_caller()
        return json_response({"object": "key", "name": caller.key.name if caller and caller.key else None,
                              "scopes": sorted(caller.scopes) if caller else []})

    @app.get("/v1/models")
    def models():
        return to_response(state.ready_backend().models())

    @app.post("/v1/completions")
    def completions():
        return to_response(state.ready_backend().completions(request.get_data(cache=False)))

    @app.post("/v1/chat/completions")
    def chat_completions():
        return to_response(state.ready_backend().chat_completions(request.get_data(cache=False)))


def admin_routes(app: Flask, state: AppState) -> None:
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
