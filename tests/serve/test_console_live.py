"""The console API against a real `python -m serve`: a rollback changes what /v1/models serves within the
registry poll, and a training-file upload bigger than the limit is refused while it is still being sent."""

from __future__ import annotations

import select
import socket
import time

import httpx
import pytest

from artifacts import Registry
from tests.serve.conftest import ADMIN_KEY, API_KEY, base_registry, start_server, train_adapter

pytestmark = pytest.mark.slow  # two tiny trainings and a server start: ~30 s alone, more on a shared CPU
POLL = 0.2  # SERVE_POLL_SECONDS here: a rollback is served after the next poll
LIMIT = 1 << 20  # SERVE_MAX_UPLOAD_BYTES here


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("console-live")
    reg_dir = base_registry(tiny_model, work)
    reg = Registry(reg_dir)
    for seed in (1, 2):  # menu v1, v2: two differently trained adapters
        reg.publish_run(train_adapter(tiny_model, work / "runs", f"menu-{seed}", seed), "menu")
    s = start_server(reg_dir, {"SERVE_API_KEY": API_KEY, "SERVE_ADMIN_KEY": ADMIN_KEY, "SERVE_THREADS": "2",
                               "SERVE_POLL_SECONDS": str(POLL), "SERVE_MAX_UPLOAD_BYTES": str(LIMIT),
                               "SERVE_MAX_MODEL_LEN": "128"})
    yield s
    s.stop()


def _served_version(url: str) -> str | None:
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()
    return next((m.get("version") for m in models["data"] if m["id"] == "menu"), None)


def _wait_for_version(url: str, want: str, polls: int = 300) -> str | None:
    """What /v1/models serves as `menu`, re-read every poll period until it is `want` (a bounded wait)."""
    got = _served_version(url)
    for _ in range(polls):
        if got == want:
            break
        time.sleep(POLL)
        got = _served_version(url)
    return got


def test_a_rollback_changes_what_v1_models_serves(server):
    assert _wait_for_version(server.url, "v2") == "v2"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    refused = httpx.post(f"{server.url}/v1/registry/models/menu/rollback", json={"version": "v1"}, timeout=30,
                         headers={"Authorization": f"Bearer {API_KEY}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope"
    r = httpx.post(f"{server.url}/v1/registry/models/menu/rollback", json={"version": "v1"}, headers=admin, timeout=30)
    assert r.status_code == 200 and r.json()["serving_version"] == "v1"
    assert _wait_for_version(server.url, "v1") == "v1"
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "menu", "messages": [{"role": "user", "content": "soup?"}], "max_tokens": 2})
    assert chat.status_code == 200, chat.text


def test_a_huge_upload_is_refused_with_413_before_it_is_read(server):
    """A 64 MiB multipart upload against a 1 MiB limit: the 413 arrives while the client is still sending."""
    total, piece, boundary = 64 * 2**20, b"x" * 65536, "tunestackboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode()
    request = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(head) + total}\r\n\r\n"
               ).encode() + head
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(request)
        s.setblocking(False)
        sent = 0
        while sent < total:
            readable, writable, _ = select.select([s], [s], [], 30)
            if readable or not writable:
                break
            try:
                sent += s.send(piece)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        s.setblocking(True)
        s.settimeout(60)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    status = int(data.split(b" ", 2)[1])
    assert status == 413, data[:500]
    assert sent < total // 2, sent  # the server answered without reading the body: it was never held
    files = httpx.get(f"{server.url}/v1/files", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()
    assert files["data"] == []  # nothing stored
