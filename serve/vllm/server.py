"""vLLM backend: launch vLLM's OpenAI server configured from the registry, behind a thin metrics proxy.

    client ──> proxy (this process, gunicorn; vllm_proxy.py) ──> vLLM api_server (child process, 127.0.0.1)
                 │ auth, 413, per-adapter Prometheus metrics, admin API
                 └─ AdapterSync: registry ──/v1/load_lora_adapter, /v1/unload_lora_adapter──> vLLM

vLLM gets `--enable-lora`, `--max-lora-rank` derived from the registered adapters (rounded up to a
rank vLLM allows), `--max-loras`/`--max-cpu-loras` from settings, `--max-num-seqs` from
SERVE_MAX_BATCH, and the registered adapters. Adapters published later are loaded through vLLM's
runtime LoRA API by the same registry watcher, so replicas sharing one registry volume converge on
the same set.

vLLM dying is fatal to the server: /ready turns 503 and the process exits non-zero, so that
Kubernetes or compose restart the pair (a proxy in front of nothing must not keep its pod).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import httpx

from artifacts import Registry
from lm.adapters import vllm_max_lora_rank
from lm.loading import module_names_from_config
from serve.adapters import AdapterState, AdapterSync, Refused
from serve.metrics import Metrics
from serve.settings import Settings
from serve.vllm_proxy import VLLMProxy

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger("serve.vllm")
MONITOR_SECONDS = 0.5  # how often the worker checks vLLM is alive: /ready turns 503 within this of its death


def vllm_command(settings: Settings, base_path: str, served_name: str, max_lora_rank: int,
                 adapters: dict[str, str], port: int, cpu: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base_path,
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(settings.max_loras),
           "--max-cpu-loras", str(max(settings.max_cpu_loras, settings.max_loras)),
           "--max-model-len", str(settings.max_model_len),
           "--max-num-seqs", str(settings.max_batch)]  # SERVE_MAX_BATCH bounds vLLM's running batch too
    if settings.dtype != "auto":
        cmd += ["--dtype", settings.dtype]
    elif cpu:
        cmd += ["--dtype", "float32"]  # CPU: fp32 gives outputs identical to the PyTorch engine
    if adapters:
        cmd += ["--lora-modules", *(f"{n}={p}" for n, p in sorted(adapters.items()))]
    return cmd + shlex.split(settings.vllm_args)  # last: SERVE_VLLM_ARGS overrides any of the above


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


# -- launch ---------------------------------------------------------------------------------------
@dataclass
class LaunchPlan:
    """What vLLM is started with, and what the proxy needs to reach it and keep its adapters in sync."""

    registry: Registry
    name: str  # the served base model name
    path: str  # the base model's weights
    sha256: str
    base_modules: set[str]
    max_lora_rank: int
    startup: dict[str, str]  # adapters passed as --lora-modules, name -> path
    port: int
    launched: dict[str, AdapterState]  # their states once vLLM is up (checked once, here)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def adapter_sync(self, max_lora_rank: int, metrics: Metrics, poll_seconds: float) -> AdapterSync:
        return AdapterSync(self.registry, VLLMLoader(self.url), self.sha256, self.base_modules, max_lora_rank,
                           metrics, poll_seconds)


def plan_launch(settings: Settings, metrics: Metrics) -> LaunchPlan:
    """Read the registry: the base model, the adapters vLLM starts with (each checked once) and the
    max LoRA rank they need (rounded up to a rank vLLM allows).

    A bad base refuses the whole start-up (ConfigurationError: `python -m serve` exits 2 with one
    line). A bad adapter refuses that adapter only: it is left out of the launch, and the registry
    watcher's first pass records it as refused with its reason (logs, /admin/adapters)."""
    from serve.server import ConfigurationError, registry_base

    reg, name, path, sha = registry_base(settings)
    try:
        modules = module_names_from_config(path)
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"base model {name} at {path}: unreadable config ({str(e).splitlines()[0]})") from None
    plan = LaunchPlan(reg, name, path, sha, modules, settings.max_lora_rank, {},
                      settings.vllm_port or _free_port(), {})
    probe = plan.adapter_sync(settings.max_lora_rank, metrics, settings.poll_seconds)
    for n in reg.names("adapters"):  # every name and pinned name@vN
        try:
            plan.startup[n], plan.launched[n] = probe.checked_state(n)
        except (Refused, ValueError, OSError) as e:  # ManifestError, RegistryError: this adapter only
            log.warning("adapter %s refused at launch: %s", n, str(e).splitlines()[0] if str(e) else type(e).__name__)
    need = max((st.rank for st in plan.launched.values()), default=settings.max_lora_rank)
    plan.max_lora_rank = vllm_max_lora_rank(need) or 512
    return plan


class VLLMChild:
    """The vLLM server process, in its own session so that stopping it stops its workers too.

    Only the process that started it (gunicorn's master) stops it or judges how it ended: the forked
    worker cannot wait on it, and a worker exiting must never take vLLM down."""

    def __init__(self, settings: Settings, plan: LaunchPlan):
        import torch

        cpu = not torch.cuda.is_available()
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        if cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        cmd = vllm_command(settings, plan.path, plan.name, plan.max_lora_rank, plan.startup, plan.port, cpu)
        log.info("starting vLLM: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        self.owner = os.getpid()
        self.stopped = False  # set when we stop it: an exit before that is a crash

    def alive(self) -> bool:
        """Works in gunicorn's forked worker too, where Popen.poll() cannot wait on the master's child."""
        try:
            os.kill(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie (exited, not yet reaped by the master) counts as dead
            with open(f"/proc/{self.proc.pid}/stat") as f:
                return f.read().split(") ", 1)[1][0] != "Z"
        except OSError:
            return True

    def wait_healthy(self, url: str) -> bool:
        """Poll vLLM's /health until it answers 200 (True) or the process exits (False)."""
        http = httpx.Client(timeout=2)
        while self.alive():
            try:
                if http.get(f"{url}/health").status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return False

    @property
    def crashed(self) -> bool:
        """vLLM exited without being asked to (owner only)."""
        return os.getpid() == self.owner and self.proc.poll() is not None and not self.stopped

    def stop(self, *_) -> None:
        if os.getpid() != self.owner:
            return
        if self.proc.poll() is None:
            self.stopped = True
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)  # what a killed server leaves behind: its engine core
        self.proc.wait()


def run_vllm(settings: Settings) -> int:
    """Start vLLM (child) and the proxy (gunicorn, this process); stop vLLM when the proxy stops.

    Exits 1 when vLLM died on its own (the worker's monitor stopped gunicorn): a restart is needed."""
    from serve.server import run_gunicorn

    metrics = Metrics()
    plan = plan_launch(settings, metrics)
    child = VLLMChild(settings, plan)
    code = 0
    try:
        run_gunicorn(lambda: proxy_app(settings, plan, child, metrics, on_dead=_stop_master), settings,
                     on_exit=child.stop)
    except SystemExit as e:  # gunicorn's master ends with sys.exit(status)
        if os.getpid() != child.owner:
            raise  # gunicorn's forked worker leaving: its exit is gunicorn's business
        code = e.code if isinstance(e.code, int) else 1
    finally:
        child.stop()
    if child.crashed:
        # its status is lost: gunicorn's SIGCHLD handler reaps every child of the master, vLLM included
        log.error("vLLM (pid %d) exited without being stopped; exiting 1 so that the server is restarted",
                  child.proc.pid)
        return 1
    return code


def proxy_app(settings: Settings, plan: LaunchPlan, child: VLLMChild, metrics: Metrics,
              on_dead: Callable[[], None]) -> Flask:
    """The app (in gunicorn's worker): it answers /health at once, serves once vLLM is healthy, and
    stops serving (/ready 503) once vLLM is gone.

    on_dead: called when vLLM exits or its monitor fails (under gunicorn: stop the master, which exits 1)."""
    from serve.app import build_app

    app = build_app(settings, None, metrics)
    threading.Thread(target=_monitor, args=(app, settings, plan, child, metrics, on_dead),
                     name="vllm-monitor", daemon=True).start()
    return app


def _monitor(app: Flask, settings: Settings, plan: LaunchPlan, child: VLLMChild, metrics: Metrics,
             on_dead: Callable[[], None]) -> None:
    """Serve once vLLM is healthy, then watch it; however this ends, the app stops serving and on_dead runs."""
    try:
        if not child.wait_healthy(plan.url):
            log.error("vLLM exited before becoming healthy")
        else:
            _serve(app, settings, plan, metrics)
            while child.alive():
                time.sleep(MONITOR_SECONDS)
            log.error("vLLM (pid %d) exited; not ready, stopping", child.proc.pid)
    except Exception:
        log.exception("vLLM monitor failed; stopping")
    finally:
        _unserve(app)
        on_dead()


def _serve(app: Flask, settings: Settings, plan: LaunchPlan, metrics: Metrics) -> None:
    from serve.app import set_serving

    sync = plan.adapter_sync(plan.max_lora_rank, metrics, settings.poll_seconds)
    for n, state in plan.launched.items():  # already loaded by --lora-modules at launch
        sync.mark_loaded(n, state)
    sync.start()
    set_serving(app, VLLMProxy(plan.url, plan.name, sync, metrics, settings.max_model_len,
                                   max_batch=settings.max_batch), sync)
    log.info("ready: vLLM %s with max-lora-rank %d, adapters %s", plan.name, plan.max_lora_rank, sync.loaded())


def _unserve(app: Flask, reason: str = "vLLM exited") -> None:
    """/health, /ready and /v1/* answer 503 with the reason from now on; the registry watcher stops
    loading into a dead vLLM."""
    from serve.app import set_failed

    set_failed(app, reason)
    state = app.extensions["tunestack"]
    sync, state.backend, state.sync = state.sync, None, None
    if sync is not None:
        sync.stop()


def _stop_master() -> None:
    os.kill(os.getppid(), signal.SIGTERM)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # already gone
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
