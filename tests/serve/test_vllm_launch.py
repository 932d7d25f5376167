"""The vLLM backend's launch wiring without vLLM: the registry plans the launch, a stub stands in for the
server, and the proxy app serves once the stub is healthy (test_vllm_backend.py runs the real vLLM)."""

from __future__ import annotations

import sys
import threading
import time

from lm.adapters import vllm_max_lora_rank
from serve import vllm_backend
from serve.metrics import Metrics
from serve.settings import Settings

STUB = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "stub"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_launch_plan_and_proxy_wiring(registry, monkeypatch):
    settings = Settings.from_env({"SERVE_BACKEND": "vllm", "SERVE_REGISTRY": str(registry),
                                  "SERVE_MAX_LORA_RANK": "16", "SERVE_POLL_SECONDS": "60"})
    metrics = Metrics()
    plan = vllm_backend.plan_launch(settings, metrics)
    assert plan.name == "tiny-llama" and set(plan.startup) == {"chef-a", "chef-a@v1", "chef-b", "chef-b@v1"}  # big-rank refused
    assert plan.max_lora_rank == vllm_max_lora_rank(4)

    launched = []

    def stub_command(*args) -> list[str]:
        launched.append(args)
        return [sys.executable, "-c", STUB, str(args[5])]  # args: settings, path, name, rank, adapters, port, cpu

    monkeypatch.setattr(vllm_backend, "vllm_command", stub_command)
    child = vllm_backend.VLLMChild(settings, plan)
    died = threading.Event()
    app = vllm_backend.proxy_app(settings, plan, child, metrics, on_dead=died.set)
    state = app.extensions["tunestack"]
    try:
        c = app.test_client()
        t0 = time.time()
        while c.get("/ready").status_code != 200:
            assert not died.is_set() and time.time() - t0 < 20, "the proxy never became ready"
            time.sleep(0.05)
        assert c.get("/ready").json["adapters"] == ["chef-a", "chef-a@v1", "chef-b", "chef-b@v1"]
        assert c.get("/v1/models").json["data"] == [{"id": "stub"}]  # relayed from the "vLLM"
        assert state.backend.is_served("chef-a") and not state.backend.is_served("big-rank")
        assert launched[0][3:6] == (plan.max_lora_rank, plan.startup, plan.port)
    finally:
        child.stop()
        if state.sync is not None:
            state.sync.stop()
    assert not child.alive()
