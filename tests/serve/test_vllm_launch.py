"""The vLLM backend's launch wiring without vLLM: the registry plans the launch, a stub stands in for the
server, the proxy app serves once the stub is healthy and stops when it dies (test_vllm_backend.py and
tests/reliability/test_vllm_faults.py run the real vLLM)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from artifacts import Registry
from lm.adapters import vllm_max_lora_rank
from serve.__main__ import main
from serve.metrics import Metrics
from serve.settings import Settings
from serve.vllm import command, server
from serve.vllm.child import VLLMChild
from serve.vllm.launch import plan_launch
from tests.conftest import ROOT, refused
from tests.serve.conftest import ADMIN_KEY, free_port

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
    plan = plan_launch(settings, metrics)
    assert plan.name == "tiny-llama" and plan.max_lora_rank == vllm_max_lora_rank(4)  # big-rank refused: not 32

    launched = []

    def stub_command(*args) -> list[str]:
        launched.append(args)
        return [sys.executable, "-c", STUB, str(args[4])]  # args: settings, path, name, rank, port, cpu

    monkeypatch.setattr(server, "vllm_command", stub_command)
    child = server.start_child(settings, plan)
    died = threading.Event()
    app = server.proxy_app(settings, plan, child, metrics, on_dead=died.set)
    state = app.extensions["tunestack"]
    try:
        c = app.test_client()
        t0 = time.time()
        while c.get("/ready").status_code != 200:
            assert not died.is_set() and time.time() - t0 < 20, "the proxy never became ready"
            time.sleep(0.05)
        assert c.get("/ready").json["adapters"] == ["chef-a", "chef-a@v1", "chef-b", "chef-b@v1"]
        # the "vLLM"'s base card, then every servable adapter (vLLM starts with none: loaded on first request)
        assert [m["id"] for m in c.get("/v1/models").json["data"]] == ["stub", "chef-a", "chef-a@v1", "chef-b", "chef-b@v1"]
        assert state.backend.is_served("chef-a") and not state.backend.is_served("big-rank")
        assert launched[0][3:5] == (plan.max_lora_rank, plan.port)
    finally:
        child.stop()
        if state.sync is not None:
            state.sync.stop()
    assert not child.alive()


def _stub_child(monkeypatch, settings: Settings, plan) -> VLLMChild:
    monkeypatch.setattr(server, "vllm_command", lambda *a: [sys.executable, "-c", STUB, str(a[4])])
    return server.start_child(settings, plan)


def _wait(predicate, timeout: float = 30, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def test_max_batch_is_vllms_max_num_seqs():
    cmd = command.vllm_command(Settings(max_batch=7), "/m", "m", 16, 8001, cpu=True)
    assert cmd[cmd.index("--max-num-seqs") + 1] == "7"
    cmd = command.vllm_command(Settings(max_batch=7, vllm_args="--max-num-seqs 3"), "/m", "m", 16, 8001, cpu=True)
    assert cmd[-2:] == ["--max-num-seqs", "3"], "SERVE_VLLM_ARGS comes last: vLLM takes the last value"


def test_vllm_dying_turns_ready_503_and_calls_on_dead(registry, monkeypatch):
    settings = Settings.from_env({"SERVE_BACKEND": "vllm", "SERVE_REGISTRY": str(registry),
                                  "SERVE_MAX_LORA_RANK": "16", "SERVE_POLL_SECONDS": "60"})
    metrics = Metrics()
    plan = plan_launch(settings, metrics)
    child = _stub_child(monkeypatch, settings, plan)
    died = threading.Event()
    app = server.proxy_app(settings, plan, child, metrics, died.set)
    c = app.test_client()
    try:
        _wait(lambda: c.get("/ready").status_code == 200, what="ready")
        assert not died.is_set()
        os.kill(child.proc.pid, signal.SIGKILL)
        _wait(died.is_set, what="on_dead after vLLM was killed")
        assert c.get("/ready").status_code == 503 and c.get("/v1/models").status_code == 503
        assert c.get("/ready").get_json() == {"status": "failed", "reason": "vLLM exited"}
        assert c.get("/health").status_code == 503  # the process is exiting: liveness says so too
        assert child.crashed, "an exit we did not ask for is a crash"
    finally:
        child.stop()


@pytest.fixture
def quick_health(monkeypatch):
    """The monitor's /health checks at test pace (the same logic; the defaults wait ~14 s for a wedge)."""
    from serve.vllm import health

    monkeypatch.setattr(health, "PERIOD_S", 0.2)
    monkeypatch.setattr(health, "TIMEOUT_S", 0.5)


def _wedge_app(registry, monkeypatch, wedged_seconds: str):
    settings = Settings.from_env({"SERVE_BACKEND": "vllm", "SERVE_REGISTRY": str(registry), "SERVE_MAX_LORA_RANK": "16",
                                  "SERVE_POLL_SECONDS": "60", "SERVE_VLLM_WEDGED_SECONDS": wedged_seconds})
    metrics = Metrics()
    plan = plan_launch(settings, metrics)
    child = _stub_child(monkeypatch, settings, plan)
    died = threading.Event()
    return child, died, server.proxy_app(settings, plan, child, metrics, died.set)


def test_a_wedged_vllm_makes_the_server_unready_until_it_answers_again(registry, monkeypatch, quick_health):
    """The stub stopped (SIGSTOP): its process lives, its /health does not answer. /ready turns 503 and says
    why, /health (liveness: the proxy lives) stays 200; SIGCONT: ready again, and nothing was killed."""
    child, died, app = _wedge_app(registry, monkeypatch, "600")
    c = app.test_client()
    try:
        _wait(lambda: c.get("/ready").status_code == 200, what="ready")
        os.kill(child.proc.pid, signal.SIGSTOP)
        _wait(lambda: c.get("/ready").status_code == 503, what="unready while vLLM is wedged")
        body = c.get("/ready").get_json()
        assert body["status"] == "unhealthy" and "vLLM's /health did not answer" in body["reason"], body
        assert c.get("/health").status_code == 200
        os.kill(child.proc.pid, signal.SIGCONT)
        _wait(lambda: c.get("/ready").status_code == 200, what="ready again once vLLM answers")
        assert child.alive() and not died.is_set()
    finally:
        os.kill(child.proc.pid, signal.SIGCONT)
        child.stop()


def test_a_vllm_wedged_past_the_limit_is_killed_as_a_death(registry, monkeypatch, quick_health):
    child, died, app = _wedge_app(registry, monkeypatch, "2")
    c = app.test_client()
    try:
        _wait(lambda: c.get("/ready").status_code == 200, what="ready")
        os.kill(child.proc.pid, signal.SIGSTOP)
        _wait(died.is_set, what="on_dead once vLLM has been wedged for SERVE_VLLM_WEDGED_SECONDS")
        assert not child.alive() and child.crashed, "killed by the monitor: an exit the owner did not ask for"
        assert c.get("/ready").get_json() == {"status": "failed", "reason": "vLLM exited"}
    finally:
        child.stop()


def test_bad_adapter_at_launch_is_refused_and_the_rest_serve(adapter_runs, tmp_path, monkeypatch):
    """A manifest that is not JSON (a ManifestError, once fatal to the whole start-up) refuses that adapter only."""
    reg = Registry(tmp_path / "registry")
    reg.publish_run(adapter_runs["chef-a"], "chef-a")
    broken = reg.publish_run(adapter_runs["chef-b"], "broken")
    (broken / "manifest.json").unlink()  # the others are hard links into the run: never write through them
    (broken / "manifest.json").write_text("{not json")
    settings = Settings.from_env({"SERVE_BACKEND": "vllm", "SERVE_REGISTRY": str(reg.root), "SERVE_ADMIN_KEY": ADMIN_KEY,
                                  "SERVE_MAX_LORA_RANK": "16", "SERVE_POLL_SECONDS": "60"})
    metrics = Metrics()
    plan = plan_launch(settings, metrics)
    child = _stub_child(monkeypatch, settings, plan)
    app = server.proxy_app(settings, plan, child, metrics, on_dead=lambda: None)
    c = app.test_client()
    try:
        _wait(lambda: c.get("/ready").status_code == 200, what="ready")
        states = c.get("/admin/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json["adapters"]
        assert states["chef-a"]["state"] == "loaded" and states["broken"]["state"] == "refused"
        assert "manifest" in states["broken"]["reason"]
    finally:
        child.stop()


def test_unreadable_base_refuses_the_start_with_one_line(tiny_model, tmp_path, capsys):
    base = shutil.copytree(tiny_model, tmp_path / "tiny-llama")
    Registry(tmp_path / "registry").register_base(base, "tiny-llama")
    (tmp_path / "registry" / "base" / "tiny-llama" / "config.json").unlink()
    refused(main, capsys, ["--backend", "vllm", "--registry", str(tmp_path / "registry")], "tiny-llama", "config")


SERVE_WITH_STUB = f"""
import sys
from serve.vllm import server
from serve.__main__ import main
STUB = {STUB!r}
server.vllm_command = lambda *a: [sys.executable, "-c", STUB, str(a[4])]
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_server_exits_nonzero_when_vllm_dies(registry, tmp_path):
    """The whole process under gunicorn (vLLM stubbed): vLLM killed -> the server exits 1, so it is restarted."""
    port, log = free_port(), tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_STUB, "--backend", "vllm", "--registry", str(registry),
                             "--port", str(port), "--max-lora-rank", "16"], cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        _wait(lambda: _ready(port) == 200 or proc.poll() is not None, 120, "server ready")
        stubs = [p for p in psutil.Process(proc.pid).children() if "HTTPServer" in " ".join(p.cmdline())]
        assert len(stubs) == 1, log.read_text()[-2000:]
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"X-Big": "x" * 9000}, timeout=10)
        assert r.status_code == 431 and r.json()["error"]["type"] == "invalid_request_error", r.text  # the proxy too
        stubs[0].send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == 1, log.read_text()[-2000:]
        assert f"vLLM (pid {stubs[0].pid}) exited without being stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _ready(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code
    except httpx.HTTPError:
        return None
