"""Request header and request line bounds of the HTTP server (gunicorn, both backends): refused before the app
with an OpenAI-style body, 431 and 414. On the shared Flask server (conftest's `server`); the vLLM proxy's
is checked on its stub server (test_vllm_launch.py) and on the real one (tests/reliability/test_vllm_faults.py)."""

from __future__ import annotations

import httpx

from serve.settings import Settings

LIMIT = Settings().max_header_bytes  # the server fixture runs the default


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
    assert err["code"] == "request_too_large"
    return err


def test_a_header_field_over_the_limit_is_a_431(server):
    err = _error(httpx.get(f"{server.url}/v1/models", headers={"X-Big": "x" * (LIMIT + 10)}, timeout=10), 431)
    assert f"{LIMIT} bytes" in err["message"], err


def test_too_many_header_fields_is_a_431(server):
    headers = {f"X-H{i}": "1" for i in range(101)}  # gunicorn's limit_request_fields: 100
    _error(httpx.get(f"{server.url}/health", headers=headers, timeout=10), 431)


def test_a_request_line_over_the_limit_is_a_414(server):
    _error(httpx.get(f"{server.url}/v1/models?q={'x' * 5000}", timeout=10), 414)


def test_headers_under_the_limits_are_served(server):
    r = httpx.get(f"{server.url}/health", headers={"X-Big": "x" * (LIMIT - 100), **{f"X-H{i}": "1" for i in range(50)}},
                  timeout=10)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200, "the server still serves after refusals"
