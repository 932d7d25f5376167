"""The vLLM backend: launch vLLM's OpenAI server configured from the registry, behind a thin metrics proxy.

    client ──> proxy (this process, gunicorn; proxy.py) ──> vLLM api_server (child process, 127.0.0.1)
                 │ auth, 413, per-adapter Prometheus metrics, admin API
                 ├─ AdapterSync: registry ──register──> VLLMAdapters (adapters.py)
                 └─ a request for an adapter vLLM does not hold: VLLMAdapters ──/v1/load_lora_adapter,
                    /v1/unload_lora_adapter (least recently used)──> vLLM, at most --max-cpu-loras held

The plan (launch.py) reads the registry once; command.py turns it and the settings into vLLM's
command line; child.py owns the process; this module wires them under gunicorn.

vLLM dying is fatal to the server: /ready turns 503 and the process exits non-zero, so that
Kubernetes or compose restart the pair (a proxy in front of nothing must not keep its pod). A vLLM
that lives but fails its /health (health.py) makes /ready 503 until it answers again; one that fails
it for SERVE_VLLM_WEDGED_SECONDS is killed, and that is a death.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

from flask import Flask

from serve.http.app import build_app, set_failed, set_serving, set_unhealthy
from serve.metrics import Metrics
from serve.process.gunicorn import run_gunicorn
from serve.settings import Settings
from serve.vllm.child import VLLMChild
from serve.vllm.adapters import VLLMAdapters
from serve.vllm.command import vllm_adapter_capacity, vllm_command
from serve.vllm.health import HealthWatch
from serve.vllm.launch import LaunchPlan, plan_launch
from serve.vllm.proxy import VLLMProxy

log = logging.getLogger("serve.vllm")
MONITOR_SECONDS = 0.5  # how often the worker checks vLLM is alive: /ready turns 503 within this of its death


def run_vllm(settings: Settings) -> int:
    """Start vLLM (child) and the proxy (gunicorn, this process); stop vLLM when the proxy stops.

    Exits 1 when vLLM died on its own (the worker's monitor stopped gunicorn): a restart is needed."""
    metrics = Metrics()
    plan = plan_launch(settings, metrics)
    child = start_child(settings, plan)
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


def start_child(settings: Settings, plan: LaunchPlan) -> VLLMChild:
    """vLLM started with the plan's base, adapters and port (fp32 on a CPU unless SERVE_DTYPE says otherwise)."""
    import torch

    cpu = not torch.cuda.is_available()
    return VLLMChild(vllm_command(settings, plan.path, plan.name, plan.max_lora_rank, plan.port, cpu), cpu)


def proxy_app(settings: Settings, plan: LaunchPlan, child: VLLMChild, metrics: Metrics,
              on_dead: Callable[[], None]) -> Flask:
    """The app (in gunicorn's worker): it answers /health at once, serves once vLLM is healthy, and
    stops serving (/ready 503) once vLLM is gone.

    on_dead: called when vLLM exits or its monitor fails (under gunicorn: stop the master, which exits 1)."""
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
            _watch(app, child, HealthWatch(plan.url, settings.vllm_wedged_seconds))
            log.error("vLLM (pid %d) exited; not ready, stopping", child.proc.pid)
    except Exception:
        log.exception("vLLM monitor failed; stopping")
    finally:
        _unserve(app)
        on_dead()


def _watch(app: Flask, child: VLLMChild, health: HealthWatch) -> None:
    """Until vLLM exits: /ready follows its /health; a vLLM wedged past the limit is killed (then it exits)."""
    while child.alive():
        time.sleep(MONITOR_SECONDS)
        if not health.due():
            continue
        problem = health.check()
        if problem != app.extensions["tunestack"].unhealthy:
            log.warning("vLLM: %s", problem or "/health answers again; ready")
        set_unhealthy(app, problem)
        if health.wedged():
            log.error("vLLM (pid %d) has failed /health for %g s: killing it", child.proc.pid, health.wedged_seconds)
            child.kill()


def _serve(app: Flask, settings: Settings, plan: LaunchPlan, metrics: Metrics) -> None:
    adapters = VLLMAdapters(plan.url, vllm_adapter_capacity(settings), metrics)
    sync = plan.adapter_sync(adapters, plan.max_lora_rank, metrics, settings.poll_seconds)
    adapters.on_failure = sync.load_failed  # a load on first request that vLLM refuses marks the adapter failed
    sync.start()
    set_serving(app, VLLMProxy(plan.url, plan.name, sync, metrics, settings.max_model_len,
                               max_batch=settings.max_batch, adapters=adapters), sync)
    log.info("ready: vLLM %s with max-lora-rank %d, %d adapters servable (vLLM holds at most %d)",
             plan.name, plan.max_lora_rank, len(sync.loaded()), adapters.capacity)


def _unserve(app: Flask, reason: str = "vLLM exited") -> None:
    """/health, /ready and /v1/* answer 503 with the reason from now on; the registry watcher stops
    loading into a dead vLLM."""
    set_failed(app, reason)
    state = app.extensions["tunestack"]
    sync, state.backend, state.sync = state.sync, None, None
    if sync is not None:
        sync.stop()


def _stop_master() -> None:
    os.kill(os.getppid(), signal.SIGTERM)
