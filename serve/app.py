"""Flask app factory: HTTP only. Auth, errors, SSE framing and routes; the logic is in serving.py."""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serve.adapters import AdapterSync
from serve.errors import APIError, bad_request
from serve.metrics import Metrics
from serve.openapi import openapi_spec
from serve.serving import OpenAIServing, new_id, sse, usage
from serve.settings import Settings

log = logging.getLogger("serve.app")
PLAYGROUND = Path(__file__).with_name("playground.html")
OPEN_PATHS = ("/health", "/ready", "/metrics", "/openapi.json", "/")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj), status=status, mimetype="application/json")


def _bearer_ok(expected: str) -> bool:
    got = request.headers.get("Authorization", "")
    token = got[7:] if got.startswith("Bearer ") else ""
    return hmac.compare_digest(token.encode(), expected.encode())  # constant time


def build_app(settings: Settings, serving: OpenAIServing | None, metrics: Metrics,
              sync: AdapterSync | None = None) -> Flask:
    """`serving` may be None while the engine loads: /ready and /v1/* answer 503 until set_serving()."""
    app = Flask("tunestack")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.url_map.merge_slashes = False  # "//etc/passwd" must reach the name check, not redirect
    state: dict[str, Any] = {"serving": serving, "sync": sync}
    app.extensions["tunestack"] = state

    @app.errorhandler(APIError)
    def _api_error(e: APIError):
        return _json(e.body(), e.status)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(e):
        return _json(APIError(413, f"request body exceeds {settings.max_body_bytes} bytes").body(), 413)

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        return _json(APIError(e.code or 500, e.description or e.name).body(), e.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error")
        return _json({"error": {"message": "internal error", "type": "server_error", "param": None,
                                "code": None}}, 500)

    @app.before_request
    def _auth():
        p = request.path
        if p.startswith("/admin"):
            if not settings.admin_key:
                raise APIError(404, "admin API is off (set SERVE_ADMIN_KEY)")
            if not _bearer_ok(settings.admin_key):
                raise APIError(401, "invalid or missing admin key", code="invalid_api_key")
        elif p.startswith("/v1") and settings.api_key and not _bearer_ok(settings.api_key):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    def _serving() -> OpenAIServing:
        s = state["serving"]
        if s is None:
            raise APIError(503, "model is loading; retry shortly", code="not_ready")
        return s

    def _body() -> Any:
        raw = request.get_data(cache=False)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"invalid JSON body: {e}") from None

    @app.get("/health")
    def health():
        return _json({"status": "ok"})

    @app.get("/ready")
    def ready():
        if state["serving"] is None:
            return _json({"status": "loading"}, 503)
        return _json({"status": "ready", "adapters": state["sync"].loaded() if state["sync"] else []})

    @app.get("/metrics")
    def prom():
        s = state["serving"]
        if s is not None:
            st = s.engine.stats() if hasattr(s, "engine") else s.stats()
            metrics.running.set(st.get("running", 0))
            metrics.queued.set(st.get("waiting", 0))
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json")
    def openapi():
        return _json(openapi_spec())

    @app.get("/")
    def playground():
        return Response(PLAYGROUND.read_text(encoding="utf-8"), mimetype="text/html")

    @app.get("/v1/models")
    def models():
        out = _serving().models()
        return out if isinstance(out, Response) else _json(out)

    def _generate(chat: bool):
        srv = _serving()
        if hasattr(srv, "forward"):  # vLLM backend: the proxy relays and records metrics
            return srv.forward(request.path, request.get_data(cache=False))
        t0 = time.perf_counter()
        metrics.in_flight.inc()
        body = None
        try:
            body = _body()
            req, gens = (srv.chat if chat else srv.completions)(body)
        except APIError as e:
            metrics.in_flight.dec()
            model = body.get("model") if isinstance(body, dict) else None
            known = isinstance(model, str) and (model == srv.engine.model_name or
                                                (srv.sync is not None and model in srv.sync.loaded()))
            # Label only served names: arbitrary client strings must not grow the metric's label set.
            metrics.requests.labels(model if known else "_unknown", "", str(e.status)).inc()
            raise
        rid = new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        prompt_tokens = len(gens[0].prompt_ids)
        if not req.stream:
            try:
                texts = [""] * req.n
                reasons = ["stop"] * req.n
                completion = 0
                for ev in srv.run(gens):
                    i, kind = ev[0], ev[1]
                    if kind == "text":
                        texts[i] += ev[2]
                    elif kind == "done":
                        reasons[i], completion = ev[2], completion + ev[3]
                    elif kind == "error":
                        raise APIError(503, ev[2], code="engine_error")
                choices = [({"index": i, "message": {"role": "assistant", "content": texts[i]},
                             "logprobs": None, "finish_reason": reasons[i]} if chat else
                            {"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]})
                           for i in range(req.n)]
                srv.record(req, gens, 200, completion, t0)
                return _json({"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices,
                              "usage": usage(prompt_tokens * req.n, completion)})
            except APIError as e:
                srv.record(req, gens, e.status, 0, t0)
                raise
            finally:
                metrics.in_flight.dec()

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, usage_obj=None) -> str:
            out = {"id": rid, "object": chunk_obj, "created": created, "model": req.model, "choices": choices}
            if req.include_usage:
                out["usage"] = usage_obj
            return sse(out)

        def stream():
            completion, status = 0, 200
            try:
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in range(req.n)])
                for ev in srv.run(gens):
                    i, kind = ev[0], ev[1]
                    if kind == "text":
                        yield chunk([{"index": i, "delta": {"content": ev[2]}, "logprobs": None, "finish_reason": None}
                                     if chat else {"index": i, "text": ev[2], "logprobs": None, "finish_reason": None}])
                    elif kind == "done":
                        completion += ev[3]
                        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev[2]} if chat else
                                     {"index": i, "text": "", "logprobs": None, "finish_reason": ev[2]}])
                    elif kind == "error":
                        status = 503
                        yield sse(APIError(503, ev[2], code="engine_error").body())
                        break
                if req.include_usage:
                    yield sse({"id": rid, "object": chunk_obj, "created": created, "model": req.model, "choices": [],
                               "usage": usage(prompt_tokens * req.n, completion)})
                yield "data: [DONE]\n\n"
            except GeneratorExit:
                status = 499  # client went away: srv.run's finally cancelled the rows, freeing their slots
                raise
            finally:
                srv.record(req, gens, status, completion, t0)
                metrics.in_flight.dec()

        return Response(stream(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    def completions():
        return _generate(chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        return _generate(chat=True)

    # -- admin: names come only from the registry ------------------------------------------------
    def _sync() -> AdapterSync:
        if state["sync"] is None:
            raise APIError(503, "not ready", code="not_ready")
        return state["sync"]

    def _registry_name(name: str) -> str:
        from artifacts import RegistryError, validate_name

        try:
            validate_name(name)
        except RegistryError as e:
            raise bad_request(str(e), "name") from None
        if name not in _sync().registry.adapters():
            raise APIError(404, f"adapter {name!r} is not in the registry", "name")
        return name

    @app.get("/admin/adapters")
    def admin_list():
        return _json({"adapters": {n: s.public() for n, s in sorted(_sync().states.items())}})

    @app.post("/admin/adapters/<path:name>/load")
    def admin_load(name: str):
        st = _sync().load(_registry_name(name))
        return _json({"name": name, **st.public()}, 200 if st.state == "loaded" else 422)

    @app.post("/admin/adapters/<path:name>/unload")
    def admin_unload(name: str):
        _sync().unload(_registry_name(name), state="disabled")
        return _json({"name": name, "state": "disabled"})

    return app


def set_serving(app: Flask, serving: OpenAIServing, sync: AdapterSync | None) -> None:
    app.extensions["tunestack"].update(serving=serving, sync=sync)
