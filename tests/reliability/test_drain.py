"""Graceful drain: SIGTERM to a real `python -m serve` while requests are in flight.

In-flight requests complete and their streams end with `data: [DONE]`; new requests get an OpenAI-style
503 ("draining") rather than a refused connection; /ready is 503 at once; the process exits 0 within the
grace period (Settings.drain_seconds + the worker's stop margin)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from serve.process.gunicorn import STOP_MARGIN_S
from tests.reliability.servers import gauge
from tests.reliability.test_client_faults import _head
from tests.serve.conftest import API_KEY, base_registry, start_server

DRAIN_SECONDS = 30  # generous: the held request below is released long before
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STREAM = {"model": "tiny-llama", "prompt": "The menu", "max_tokens": 64, "stream": True, "ignore_eos": True}


def _wait_for(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stream_lines(url: str, out: list[str]) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json=STREAM, headers=AUTH, timeout=120) as r:
        out.extend(line for line in r.iter_lines() if line)


@pytest.mark.slow  # ~15 s: a server of its own, started and drained
def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_model, tmp_path):
    server = start_server(base_registry(tiny_model, tmp_path),
                          {"SERVE_API_KEY": API_KEY, "SERVE_THREADS": "2", "SERVE_MAX_MODEL_LEN": "256",
                           "SERVE_DRAIN_SECONDS": str(DRAIN_SECONDS), "SERVE_BODY_TIMEOUT": "120"})
    try:
        # a request held in flight by its client: headers and half its body sent, the rest after SIGTERM
        body = json.dumps(STREAM).encode()
        held = socket.create_connection(("127.0.0.1", server.port))
        held.sendall(_head("/v1/completions", len(body)) + body[:10])
        _wait_for(lambda: gauge(server.url, "tunestack_http_requests_active") >= 1, "the held request to be in progress")
        streams = [[] for _ in range(3)]
        threads = [threading.Thread(target=_stream_lines, args=(server.url, out)) for out in streams]
        for t in threads:
            t.start()

        os.kill(server.proc.pid, signal.SIGTERM)  # the master only, as Kubernetes does
        _wait_for(lambda: httpx.get(f"{server.url}/ready", timeout=10).status_code == 503, "/ready to be 503")
        assert httpx.get(f"{server.url}/ready", timeout=10).json() == {"status": "draining"}
        r = httpx.post(f"{server.url}/v1/completions", json=STREAM, headers=AUTH, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining", r.text
        assert server.proc.poll() is None  # still up while the held request is in flight

        held.sendall(body[10:])
        held.settimeout(120)
        raw = b""
        while not raw.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked response
            chunk = held.recv(65536)
            assert chunk, f"stream cut: {raw[-300:]!r}"
            raw += chunk
        held.close()
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        for t in threads:
            t.join(120)
        for lines in streams:  # started before SIGTERM, or refused with a 503 if they arrived after it
            assert lines[-1] == "data: [DONE]" or json.loads(lines[0])["error"]["code"] == "draining", lines[-3:]

        assert server.proc.wait(timeout=DRAIN_SECONDS + STOP_MARGIN_S + 10) == 0
        log = server.log.read_text()
        assert "SIGTERM: draining" in log and "drained: no request in progress" in log, log
    finally:
        server.stop()
