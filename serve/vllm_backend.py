"""vLLM backend: launch vLLM's OpenAI server configured from the registry, behind a thin metrics proxy.

    client ──> proxy (this process, gunicorn) ──> vLLM api_server (child process, 127.0.0.1)
                 │ auth, 413, per-adapter Prometheus metrics, admin API
                 └─ AdapterSync: registry ──/v1/load_lora_adapter, /v1/unload_lora_adapter──> vLLM

vLLM gets `--enable-lora`, `--max-lora-rank` derived from the registered adapters (rounded up to a
rank vLLM allows), `--max-loras`/`--max-cpu-loras` from settings, and the registered adapters.
Adapters published later are loaded through vLLM's runtime LoRA API by the same registry watcher,
so replicas sharing one registry volume converge on the same set.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

import httpx
from flask import Response

from lm.adapters import lora_rank, vllm_max_lora_rank
from lm.loading import module_names_from_config
from serve.adapters import AdapterSync, Refused
from serve.errors import APIError, bad_request
from serve.metrics import Metrics
from serve.settings import Settings

log = logging.getLogger("serve.vllm")


def derive_max_lora_rank(sync: AdapterSync, names: list[str], fallback: int) -> int:
    ranks = []
    for n in names:
        try:
            _, pc = sync.check(n)
            ranks.append(lora_rank(pc))
        except Refused:
            continue
    return vllm_max_lora_rank(max(ranks) if ranks else fallback) or 512


def vllm_command(settings: Settings, base_path: str, served_name: str, max_lora_rank: int,
                 adapters: dict[str, str], port: int, cpu: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base_path,
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(settings.max_loras),
           "--max-cpu-loras", str(max(settings.max_cpu_loras, settings.max_loras)),
           "--max-model-len", str(settings.max_model_len)]
    if settings.dtype != "auto":
        cmd += ["--dtype", settings.dtype]
    elif cpu:
        cmd += ["--dtype", "float32"]  # CPU: fp32 gives outputs identical to the PyTorch engine
    if adapters:
        cmd += ["--lora-modules", *(f"{n}={p}" for n, p in sorted(adapters.items()))]
    return cmd + shlex.split(settings.vllm_args)


class VLLMLoader:
    """AdapterSync's loader for a running vLLM: its runtime LoRA API."""

    def __init__(self, base_url: str):
        self.http = httpx.Client(base_url=base_url, timeout=120)

    def load_adapter(self, name: str, path: str) -> None:
        self.unload_adapter(name, missing_ok=True)  # a re-publish under the same name replaces it
        r = self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if r.status_code != 200:
            raise RuntimeError(f"vLLM refused {name}: {r.text[:300]}")

    def unload_adapter(self, name: str, missing_ok: bool = False) -> None:
        r = self.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code != 200 and not missing_ok:
            raise RuntimeError(f"vLLM could not unload {name}: {r.text[:300]}")


class _Upstream:
    """Keep-alive HTTP/1.1 connections to vLLM, one per proxy thread (http.client: ~10x less work than httpx)."""

    def __init__(self, base_url: str):
        hostport = base_url.split("//", 1)[1]
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn = conn
        return conn

    def drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, path: str, body: bytes | None = None) -> http.client.HTTPResponse:
        for attempt in (0, 1):  # a keep-alive connection vLLM closed meanwhile: reconnect once
            try:
                conn = self._conn()
                conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
                return conn.getresponse()
            except (http.client.HTTPException, OSError):
                self.drop()
                if attempt:
                    raise
        raise AssertionError("unreachable")


class VLLMProxy:
    """Forwards OpenAI requests to vLLM, recording per-adapter metrics on the way."""

    def __init__(self, base_url: str, served_name: str, sync: AdapterSync, metrics: Metrics,
                 max_model_len: int = 2048):
        self.base_url = base_url
        self.max_model_len = max_model_len
        self.model_name = served_name
        self.sync = sync
        self.metrics = metrics
        self.up = _Upstream(base_url)

    def stats(self) -> dict[str, int]:
        return {}

    def models(self) -> Response:
        r = self.up.request("GET", "/v1/models")
        return Response(r.read(), r.status, mimetype="application/json")

    def forward(self, path: str, raw: bytes) -> Response:
        t0 = time.perf_counter()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"invalid JSON body: {e}") from None
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        model = body.get("model") if isinstance(body.get("model"), str) else ""
        if model != self.model_name and (self.sync is None or model not in self.sync.loaded()):
            model = "_unknown"  # arbitrary client strings must not grow the metric's label set
        adapter = "" if model in (self.model_name, "_unknown") else model
        lab = (model, adapter)
        self._check_context(path, body)
        stream = body.get("stream") is True
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else True
        if stream and not wants_usage:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            raw = json.dumps(body).encode()
        self.metrics.in_flight.inc()
        before = time.perf_counter() - t0
        try:
            up = self.up.request("POST", path, raw)
        except (http.client.HTTPException, OSError) as e:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(*lab, "503").inc()
            raise APIError(503, f"vLLM is unavailable: {e}", code="upstream_unavailable") from None
        if not stream or up.status != 200:
            t1 = time.perf_counter()
            data = up.read()
            usage = None
            if up.status == 200:
                try:
                    usage = json.loads(data).get("usage")
                except ValueError:
                    pass
            self._record(lab, up.status, t0, usage, None)
            self.metrics.in_flight.dec()
            self.metrics.proxy_overhead.observe(before + time.perf_counter() - t1)
            return Response(data, up.status, mimetype=up.getheader("content-type", "application/json"))
        self.metrics.proxy_overhead.observe(before)
        return Response(self._relay(up, lab, t0, wants_usage), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _check_context(self, path: str, body: dict) -> None:
        """400 for prompt + max_tokens beyond the context, as the Flask backend does (vLLM would clamp).

        Fast path without tokenising: UTF-8 bytes bound byte-level BPE token counts from above, so
        a request that fits by that bound is forwarded untouched; only near-limit ones ask /tokenize.
        """
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            return
        text = body.get("prompt") if path.endswith("/completions") and "chat" not in path else body.get("messages")
        bound = len(json.dumps(text, ensure_ascii=False).encode()) + 64  # + chat template tokens
        if max_tokens + bound <= self.max_model_len:
            return
        key = "messages" if "chat" in path else "prompt"
        r = self.up.request("POST", "/tokenize", json.dumps({"model": body.get("model"), key: text}).encode())
        data = r.read()
        if r.status != 200:
            return  # let vLLM report what is wrong with the request itself
        count = json.loads(data).get("count", 0)
        if count + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{count + max_tokens} tokens ({count} in the prompt, {max_tokens} in the completion).",
                "max_tokens", "context_length_exceeded")

    def _relay(self, up: http.client.HTTPResponse, lab, t0: float, wants_usage: bool) -> Iterator[bytes]:
        first = None
        usage = None
        status = 200
        finished = False
        try:
            while True:
                raw = up.readline()
                if not raw:
                    finished = True
                    break
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    continue
                if line.startswith("data: {"):
                    compact = line.replace(" ", "")
                    if first is None and '"choices":[{' in compact:
                        first = time.perf_counter()
                    if '"usage":{' in compact:
                        try:
                            obj = json.loads(line[6:])
                            usage = obj.get("usage") or usage
                            if not wants_usage and not obj.get("choices"):
                                continue  # the usage chunk we asked for ourselves
                        except ValueError:
                            pass
                yield (line + "\n\n").encode()
        except GeneratorExit:
            status = 499  # client left: closing the upstream connection makes vLLM abort the request
            raise
        finally:
            if not finished:
                self.up.drop()
            self._record(lab, status, t0, usage, first)
            self.metrics.in_flight.dec()

    def _record(self, lab, status: int, t0: float, usage: dict | None, first: float | None) -> None:
        m = self.metrics
        m.requests.labels(*lab, str(status)).inc()
        if status != 200 or not usage:
            return
        end = time.perf_counter()
        m.prompt_tokens.labels(*lab).inc(usage.get("prompt_tokens", 0))
        out = usage.get("completion_tokens", 0)
        m.generation_tokens.labels(*lab).inc(out)
        m.e2e.labels(*lab).observe(end - t0)
        if first is not None:
            m.ttft.labels(*lab).observe(first - t0)
            if out > 1:
                m.tpot.labels(*lab).observe((end - first) / (out - 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_vllm(settings: Settings) -> int:
    """Start vLLM (child) and the proxy (gunicorn, this process); stop vLLM when the proxy stops."""
    import torch

    from serve.app import build_app, set_serving
    from serve.server import registry_base, run_gunicorn

    reg, name, path, sha = registry_base(settings)
    metrics = Metrics()
    vport = settings.vllm_port or _free_port()
    vurl = f"http://127.0.0.1:{vport}"
    base_modules = module_names_from_config(path)
    probe = AdapterSync(reg, VLLMLoader(vurl), sha, base_modules, settings.max_lora_rank, metrics, settings.poll_seconds)
    names = reg.adapters()
    rank = derive_max_lora_rank(probe, names, settings.max_lora_rank)
    startup = {}
    for n in names:
        try:
            startup[n] = probe.check(n)[0]
        except Refused as e:
            log.warning("adapter %s refused at launch: %s", n, e)
    cpu = not torch.cuda.is_available()
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    cmd = vllm_command(settings, path, name, rank, startup, vport, cpu)
    log.info("starting vLLM: %s", " ".join(cmd))
    child = subprocess.Popen(cmd, env=env, start_new_session=True)

    def alive() -> bool:
        """Works in gunicorn's forked worker too, where Popen.poll() cannot wait on the master's child."""
        try:
            os.kill(child.pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie (exited, not yet reaped by the master) counts as dead
            with open(f"/proc/{child.pid}/stat") as f:
                return f.read().split(") ", 1)[1][0] != "Z"
        except OSError:
            return True

    def stop_child(*_):
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)

    def factory():
        app = build_app(settings, None, metrics)

        def wait_and_sync():
            http = httpx.Client(timeout=2)
            while alive():
                try:
                    if http.get(f"{vurl}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            if not alive():
                log.error("vLLM exited before becoming healthy")
                os.kill(os.getppid(), signal.SIGTERM)
                return
            sync = AdapterSync(reg, VLLMLoader(vurl), sha, base_modules, rank, metrics, settings.poll_seconds)
            for n in startup:  # already loaded by --lora-modules at launch
                sync.mark_loaded(n)
            sync.start()
            set_serving(app, VLLMProxy(vurl, name, sync, metrics, settings.max_model_len), sync)
            log.info("ready: vLLM %s with max-lora-rank %d, adapters %s", name, rank, sync.loaded())

        threading.Thread(target=wait_and_sync, name="vllm-wait", daemon=True).start()
        return app

    try:
        run_gunicorn(factory, settings, on_exit=stop_child)
    finally:
        stop_child()
    return 0
