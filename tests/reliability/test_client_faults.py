"""Client faults against a real `python -m serve` (tiny model): slow bodies, huge max_tokens, huge bodies,
invalid UTF-8, empty prompts. Each is answered with an OpenAI-style 4xx, and the server keeps serving."""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import pytest

from tests.serve.conftest import API_KEY, base_registry, start_server

BASE = "tiny-llama"
BODY_TIMEOUT = 2  # seconds: SERVE_BODY_TIMEOUT of this server, short so the slow-body tests stay short
HTTP_THREADS = 4  # few: stalled clients that held their threads would starve the server at once
MAX_BODY = 65536
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    s = start_server(base_registry(tiny_model, tmp_path_factory.mktemp("client-faults")),
                     {"SERVE_API_KEY": API_KEY, "SERVE_THREADS": "2", "SERVE_MAX_MODEL_LEN": "256",
                      "SERVE_BODY_TIMEOUT": str(BODY_TIMEOUT), "SERVE_HTTP_THREADS": str(HTTP_THREADS),
                      "SERVE_MAX_BODY_BYTES": str(MAX_BODY)})
    yield s
    s.stop()


def _head(path: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode()


def _response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of the one response on `sock`; fails after `timeout` s without one."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(head.split()[1]), json.loads(body)


def _assert_openai_error(body: dict, status: int, got: int) -> dict:
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def _still_serving(server) -> None:
    r = httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": BASE, "prompt": "The menu", "max_tokens": 2})
    assert r.status_code == 200, r.text


# -- slow bodies ------------------------------------------------------------------------------------

def test_stalled_bodies_get_408_and_free_every_thread(server):
    """As many clients as HTTP threads send half a body and stop: each gets 408, then the server serves."""
    body = json.dumps({"model": BASE, "prompt": "x"}).encode()
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(HTTP_THREADS)]
    try:
        for s in socks:
            s.sendall(_head("/v1/completions", len(body)) + body[:5])
        for s in socks:
            status, payload = _response(s, timeout=BODY_TIMEOUT + 30)
            err = _assert_openai_error(payload, 408, status)
            assert f"within {BODY_TIMEOUT} s" in err["message"]
    finally:
        for s in socks:
            s.close()
    _still_serving(server)


def test_trickled_body_gets_408_before_it_is_complete(server):
    """One byte every 0.2 s: every read succeeds, but the whole body misses the deadline."""
    body = json.dumps({"model": BASE, "prompt": "x"}).encode().ljust(400)  # JSON allows trailing spaces
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(_head("/v1/completions", len(body)))
        sent = 0
        while sent < len(body) and not select.select([s], [], [], 0.2)[0]:
            s.sendall(body[sent:sent + 1])
            sent += 1
        status, payload = _response(s, timeout=BODY_TIMEOUT + 30)
    _assert_openai_error(payload, 408, status)
    assert sent < len(body)  # answered before the client finished: its thread was not held to the end


# -- limits -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9},
     "max_tokens"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 10**9}, "max_completion_tokens"),
])
def test_max_tokens_of_a_billion_is_400(server, path, body, param):
    r = httpx.post(server.url + path, json=body, headers=AUTH, timeout=60)
    err = _assert_openai_error(r.json(), 400, r.status_code)
    assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_50_mb_body_gets_413_without_being_read(server, framing):
    """A client streams 50 MB: the 413 arrives while it is still sending, long before the end."""
    total, piece = 50 * 2**20, b" " * 65536
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if framing == "chunked" else piece
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(_head("/v1/completions", total if framing == "content-length" else None))
        s.setblocking(False)
        sent = 0
        while sent < total:
            readable, writable, _ = select.select([s], [s], [], 30)
            if readable or not writable:
                break
            try:
                sent += s.send(frame)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        s.setblocking(True)
        status, payload = _response(s)
    err = _assert_openai_error(payload, 413, status)
    assert str(MAX_BODY) in err["message"]
    assert sent < total // 2, sent  # at most the socket buffers' worth: the server did not read it all
    _still_serving(server)


# -- malformed input --------------------------------------------------------------------------------

@pytest.mark.parametrize("path,raw", [
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "caf\xe9"}'),  # Latin-1, not UTF-8
    ("/v1/completions", b"\xc3\x28"),
    ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
    # found by this suite: a lone surrogate, encoded or escaped, reached the tokenizer (json.loads allows both)
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "\\ud800"}'),
    ("/v1/completions", '{"model": "tiny-llama", "prompt": "x"}'.encode("utf-16")),
])
def test_invalid_utf8_is_400(server, path, raw):
    r = httpx.post(server.url + path, content=raw, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    err = _assert_openai_error(r.json(), 400, r.status_code)
    assert err["type"] == "invalid_request_error" and "invalid JSON body" in err["message"]


@pytest.mark.parametrize("path,fields,param", [
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [""]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),  # token ids are not accepted
    ("/v1/completions", {"prompt": [[1, 2]]}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
])
def test_empty_prompts_are_400_naming_the_param(server, path, fields, param):
    r = httpx.post(server.url + path, json={"model": BASE, **fields}, headers=AUTH, timeout=60)
    err = _assert_openai_error(r.json(), 400, r.status_code)
    assert err["param"] == param, err


def test_probes_count_no_request_in_flight_after_the_faults(server):
    """Every fault above was counted out: nothing holds the in-flight gauge (run last in this module)."""
    deadline = time.monotonic() + 30
    while "tunestack_requests_in_flight 0.0" not in httpx.get(f"{server.url}/metrics").text:
        assert time.monotonic() < deadline, "in-flight gauge never returned to 0"
        time.sleep(0.2)
