"""Auth against a real server with SERVE_API_KEY and SERVE_ADMIN_KEY set.

The routes come from the Flask url_map, so a new route cannot be forgotten: every route but the open
ones (probes, the Prometheus scrape, the API description, the playground page) needs its key. Neither
key may appear in the server's output, in /metrics, or in any response body."""

from __future__ import annotations

import re

import httpx
import pytest

from serve.http.app import OPEN_PATHS, build_app
from serve.metrics import Metrics
from serve.settings import Settings
from tests.serve.conftest import ADMIN_KEY, API_KEY, base_registry, start_server

OPEN = {"/health", "/ready", "/metrics", "/openapi.json", "/", "/console"}  # documented as open: README and serve/http/app.py
CONSOLE_FILES = "/console/static/<path:name>"  # open by its rule: only the shipped files (docs/console.md), else 404


def _routes() -> list[tuple[str, str]]:
    """(method, path) of every route, path parameters filled with an adapter name."""
    app = build_app(Settings(api_key=API_KEY, admin_key=ADMIN_KEY), None, Metrics())
    return sorted((method, re.sub(r"<(?:[^:>]+:)?[^>]+>", "chef-a", rule.rule))
                  for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"})


ROUTES = _routes()
CLOSED = [(m, p) for m, p in ROUTES if p not in OPEN and not p.startswith("/console/static/")]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    s = start_server(base_registry(tiny_model, tmp_path_factory.mktemp("auth")),
                     {"SERVE_API_KEY": API_KEY, "SERVE_ADMIN_KEY": ADMIN_KEY, "SERVE_THREADS": "2",
                      "SERVE_MAX_MODEL_LEN": "256", "SERVE_MAX_BODY_BYTES": "65536"})
    yield s
    s.stop()


def test_the_route_list_is_what_the_app_serves():
    assert OPEN_PATHS == OPEN | {CONSOLE_FILES}
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/admin/adapters",
            "/admin/adapters/chef-a/load", "/admin/adapters/chef-a/unload"} <= {p for _, p in CLOSED}
    assert {p for _, p in ROUTES} - {p for _, p in CLOSED} == OPEN | {"/console/static/chef-a"}


@pytest.mark.parametrize("method,path", CLOSED)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key-0000000", f"Bearer {API_KEY}x", API_KEY])
def test_every_closed_route_is_401_without_the_right_key(server, method, path, auth):
    """No key, a wrong one, a prefix-extended one, the key without "Bearer". (A right key without the route's
    scope is a 403: tests/serve/test_console_auth.py, over every route and key kind.)"""
    r = httpx.request(method, server.url + path, headers={"Authorization": auth} if auth else {},
                      json={"model": "tiny-llama", "prompt": "x"}, timeout=30)
    assert r.status_code == 401, (method, path, r.text)
    assert r.json()["error"]["type"] == "authentication_error" and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("path", sorted(OPEN))
def test_open_routes_answer_without_a_key(server, path):
    assert httpx.get(server.url + path, timeout=30).status_code == 200


def test_keys_never_appear_in_logs_metrics_or_error_bodies(server):
    """Every route with the right key, with wrong keys, and failing requests; then grep everything."""
    api, admin = {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}"}
    seen: list[str] = []
    for method, path in ROUTES:
        for headers in (api, admin, {"Authorization": f"Bearer {API_KEY[:-1]}"}, {}):
            r = httpx.request(method, server.url + path, headers=headers, timeout=60,
                              json={"model": "tiny-llama", "prompt": "x", "max_tokens": 2,
                                    "messages": [{"role": "user", "content": "x"}]})
            seen.append(r.text)
    failing = [("/v1/completions", b"{not json"), ("/v1/completions", b'{"model": "nope", "prompt": "x"}'),
               ("/v1/completions", b'{"model": "tiny-llama", "prompt": "' + b"x" * 70000 + b'"}'),
               ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": "x"}'), ("/v1/nope", b"{}"),
               ("/admin/adapters/..%2Fetc/load", b"")]
    for path, raw in failing:
        for headers in (api, admin):
            seen.append(httpx.post(server.url + path, content=raw, headers=headers, timeout=60).text)
    seen.append(httpx.get(f"{server.url}/metrics", timeout=30).text)
    output = server.log.read_text()
    assert "Traceback" not in output
    for key in (API_KEY, ADMIN_KEY):
        assert key not in output
        assert not [text for text in seen if key in text]
