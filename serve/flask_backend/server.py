"""Process wiring for the Flask backend: registry -> engine -> adapter sync -> app, under gunicorn."""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from pathlib import Path
from typing import Callable

import torch
from gunicorn.workers.gthread import ThreadWorker

from artifacts import Registry
from lm.loading import module_names
from serve.adapters import AdapterSync
from serve.app import build_app, drain_of, set_failed, set_serving
from serve.metrics import Metrics
from serve.serving import OpenAIServing
from serve.settings import Settings

log = logging.getLogger("serve")
WORKER_BOOT_ERROR = 3  # gunicorn's Arbiter.WORKER_BOOT_ERROR: the arbiter halts instead of respawning the worker
STOP_MARGIN_S = 5  # after the drain: gthread closes kept-alive connections (2 s linger) and exits


class ConfigurationError(ValueError):
    pass


def registry_base(settings: Settings) -> tuple[Registry, str, str, str]:
    reg = Registry(settings.registry)
    base = reg.base()
    if base is None:
        raise ConfigurationError(f"{settings.registry}: no base model in the registry (publish a run first: "
                                 "python -m train publish RUN --registry DIR)")
    name, path = base
    sha = reg.manifest("base", name).base_model.get("sha256", "")
    return reg, name, str(path), sha


def registry_onnx_model(settings: Settings, verify: bool = True) -> tuple[str, Path]:
    """The exported model (registry models/<name> with model.onnx) the onnx engine serves.

    verify re-hashes every file (a corrupt export is refused); `python -m serve` does it once
    before forking, the worker only resolves the name."""
    reg = Registry(settings.registry)
    onnx = [n for n in reg.names("models", versions=False) if (reg.root / "models" / n / "model.onnx").is_file()]
    if settings.model:
        if settings.model not in onnx and not (settings.model in reg.names("models")
                                               and (reg.root / "models" / settings.model / "model.onnx").is_file()):
            raise ConfigurationError(f"SERVE_MODEL: {settings.model!r} is not an ONNX model in {reg.root}/models "
                                     f"(have: {', '.join(onnx) or 'none'})")
        name = settings.model
    elif len(onnx) == 1:
        name = onnx[0]
    else:
        raise ConfigurationError(f"{reg.root}/models holds {len(onnx)} ONNX models ({', '.join(onnx) or 'none'}); "
                                 "set SERVE_MODEL (export with: python -m export all RUN --registry DIR)")
    if verify:
        reg.verify("models", name)
    return name, reg.root / "models" / name


def create_flask_app(settings: Settings):
    """The app answers /health at once; the engine loads in the background and /ready flips to 200."""
    from serve.engines.torch_engine import TorchEngine

    metrics = Metrics()
    if settings.engine == "onnx":
        return _onnx_app(settings, metrics)
    reg, name, path, sha = registry_base(settings)
    app = build_app(settings, None, metrics)

    def load() -> None:
        engine = TorchEngine(path, name, max_batch=settings.max_batch, max_model_len=settings.max_model_len,
                             threads=settings.threads, lora_impl=settings.lora_impl,
                             dtype=torch.float32 if settings.dtype == "auto" else getattr(torch, settings.dtype),
                             lean=settings.forward == "lean", cpu_on_gpu_host=settings.cpu_on_gpu_host)
        sync = AdapterSync(reg, engine, sha, module_names(engine.base), settings.max_lora_rank, metrics,
                           settings.poll_seconds)
        sync.start()
        set_serving(app, OpenAIServing(engine, sync, metrics), sync)
        log.info("ready: base %s, adapters %s", name, sync.loaded())

    load_in_background(app, load)
    return app


def _onnx_app(settings: Settings, metrics: Metrics):
    from serve.engines.ort_engine import OrtEngine

    name, path = registry_onnx_model(settings, verify=False)  # verified by python -m serve before the fork
    app = build_app(settings, None, metrics)

    def load() -> None:
        engine = OrtEngine(path, name, max_batch=settings.max_batch, max_model_len=settings.max_model_len,
                           threads=settings.threads)
        set_serving(app, OpenAIServing(engine, None, metrics), None)
        log.info("ready: ONNX model %s (%s)", name, path)

    load_in_background(app, load)
    return app


def exit_boot_error() -> None:
    """End the worker with WORKER_BOOT_ERROR: gunicorn's arbiter then stops with that code (no respawn loop)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(WORKER_BOOT_ERROR)  # from the load thread: SystemExit would end only this thread


def load_in_background(app, load: Callable[[], None], on_failure: Callable[[], None] = exit_boot_error
                       ) -> threading.Thread:
    """Run `load` on a thread; if it raises, /health and /ready say why (503), one log line, then on_failure.

    A load that fails never succeeds on retry (corrupt weights, out of memory): exiting lets the
    orchestrator see a crashed container with its reason, instead of a live pod that is never ready."""
    def guarded() -> None:
        try:
            load()
        except BaseException as e:  # noqa: BLE001 - whatever it was, this worker cannot serve
            reason = "model load failed: " + " ".join(f"{type(e).__name__}: {e}".split())[:500]
            set_failed(app, reason)
            log.error("%s", reason)
            on_failure()

    thread = threading.Thread(target=guarded, name="engine-load", daemon=True)
    thread.start()
    return thread


class DrainingWorker(ThreadWorker):
    """gunicorn's gthread worker with a drain on SIGTERM.

    gthread stops accepting at once and cuts what is still running after graceful_timeout. This worker
    keeps accepting while the app's Drain is on (/ready 503, new API requests 503 "draining"), waits for
    the requests in progress to finish (at most drain.seconds), then stops as gthread does. A second
    SIGTERM stops at once."""

    def handle_exit(self, sig, frame) -> None:
        drain = drain_of(getattr(self, "wsgi", None))
        if drain is None or drain.draining or not self.alive:
            return super().handle_exit(sig, frame)
        drain.begin()  # in the signal handler: a flag only; the thread starts from the main loop
        self.method_queue.defer(self._start_drain, drain)

    def _start_drain(self, drain) -> None:
        log.info("SIGTERM: draining %d request(s) in progress, at most %g s", drain.active, drain.seconds)

        def wait() -> None:
            idle = drain.wait_idle(drain.seconds)
            log.info("drained: %s", "no request in progress" if idle else "deadline reached")
            self.method_queue.defer(ThreadWorker.handle_exit, self, None, None)  # alive = False, as gthread

        threading.Thread(target=wait, name="drain", daemon=True).start()


def run_gunicorn(app_factory, settings: Settings, on_exit=None) -> None:
    from gunicorn.app.base import BaseApplication

    class _App(BaseApplication):
        def load_config(self):
            for k, v in {"bind": f"{settings.host}:{settings.port}", "workers": 1,
                         "worker_class": "serve.server.DrainingWorker", "threads": settings.http_threads,
                         "timeout": 300, "graceful_timeout": math.ceil(settings.drain_seconds) + STOP_MARGIN_S,
                         "keepalive": 5, "accesslog": None, "loglevel": "warning"}.items():
                self.cfg.set(k, v)
            if on_exit is not None:
                self.cfg.set("on_exit", lambda server: on_exit())

        def load(self):
            return app_factory()  # runs in the worker, after fork: engine threads live there

    _App().run()
