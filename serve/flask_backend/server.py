"""Process wiring for the Flask backend: registry -> engine -> adapter sync -> app, under gunicorn."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Callable

import torch

from lm.loading import module_names
from serve.flask_backend.serving import OpenAIServing
from serve.http.app import build_app, set_failed, set_serving
from serve.metrics import Metrics
from serve.registry_sync import AdapterSync
from serve.served_model import registry_base, registry_onnx_model
from serve.settings import Settings

log = logging.getLogger("serve")
WORKER_BOOT_ERROR = 3  # gunicorn's Arbiter.WORKER_BOOT_ERROR: the arbiter halts instead of respawning the worker


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
                             lean=settings.forward == "lean", cpu_on_gpu_host=settings.cpu_on_gpu_host,
                             max_loaded_adapters=settings.max_loaded_adapters, metrics=metrics)
        sync = AdapterSync(reg, engine, sha, module_names(engine.base), settings.max_lora_rank, metrics,
                           settings.poll_seconds, on_demand=True)
        engine.cache.on_failure = sync.load_failed  # a load on first request that fails marks the adapter failed
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
