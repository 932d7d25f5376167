"""Flask app factory: HTTP only. State on the app, auth, errors; the routes are in routes.py.

What a request means is the backend's business (openai/backend.py: OpenAIServing or VLLMProxy); the app
routes raw bodies to it and frames what comes back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from flask import Flask
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serve.errors import APIError
from serve.finetune import api as finetune_api
from serve.finetune import methods as finetune_methods
from serve.finetune import preview as finetune_preview
from serve.finetune import results as finetune_results
from serve.http import console
from serve.http.auth import authenticator, current_caller
from serve.http.keys import KeyRing
from serve.http.registry_api import registry_routes
from serve.http.routes import admin_routes, api_routes, json_response, probe_routes
from serve.metrics import Metrics
from serve.openai.backend import Backend, json_body
from serve.process.body_deadline import counted_with_deadline
from serve.process.drain import DRAIN_KEY, Drain
from serve.registry_sync import AdapterSync
from serve.settings import Settings

log = logging.getLogger("serve.http.app")
# Open without a key: probes (kubelet), the Prometheus scrape, the API description, the playground page
# (it asks the user for the key). Every other path needs a key when one is set: a new route is closed by default.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/"}) | console.open_paths()


@dataclass
class AppState:
    """The backend and its adapter sync (None until the model has loaded), a load failure, the drain."""

    backend: Backend | None = None
    sync: AdapterSync | None = None
    failed: str | None = None  # why the model could not be loaded: /health and /ready say it (503)
    unhealthy: str | None = None  # why the engine behind the app does not answer now (a wedged vLLM): /ready 503
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
    app.extensions[DRAIN_KEY] = state.drain
    app.wsgi_app = counted_with_deadline(app.wsgi_app, state.drain, settings)  # type: ignore[method-assign]
    _error_handlers(app, settings.max_body_bytes)
    ring = KeyRing(settings.api_key, settings.admin_key, settings.keys_file or None)
    app.before_request(authenticator(ring, state.drain, OPEN_PATHS))
    probe_routes(app, state, metrics)
    api_routes(app, state)
    admin_routes(app, state)
    console.console_routes(app)
    ft = finetune_api.from_settings(settings, lambda: state.ready_backend().model_name, current_caller)
    finetune_api.routes(app, ft, json_body, json_response)
    finetune_results.routes(app, ft, settings.registry, json_body, json_response)
    finetune_preview.routes(app, ft, settings.registry, json_response)
    finetune_methods.routes(app, json_response)
    registry_routes(app, settings.registry)
    return app


def set_serving(app: Flask, serving: Backend, sync: AdapterSync | None) -> None:
    state: AppState = app.extensions["tunestack"]
    state.sync, state.backend = sync, serving  # sync first: a ready backend always has its adapters


def set_unhealthy(app: Flask, reason: str | None) -> None:
    """The engine does not answer its health check (reason) or answers again (None): /ready follows."""
    app.extensions["tunestack"].unhealthy = reason


def set_failed(app: Flask, reason: str) -> None:
    """The model will never load: /health and /ready answer 503 with `reason` (the process exits next)."""
    app.extensions["tunestack"].failed = reason


# -- errors ----------------------------------------------------------------------------
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
