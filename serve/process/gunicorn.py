"""The WSGI server's process: gunicorn's gthread worker with a drain on SIGTERM, one worker per server."""

from __future__ import annotations

import logging
import math
import threading

from gunicorn.workers.gthread import ThreadWorker

from serve.process.drain import drain_of
from serve.settings import Settings

log = logging.getLogger("serve")
STOP_MARGIN_S = 5  # after the drain: gthread closes kept-alive connections (2 s linger) and exits


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
                         "worker_class": "serve.process.gunicorn.DrainingWorker", "threads": settings.http_threads,
                         "timeout": 300, "graceful_timeout": math.ceil(settings.drain_seconds) + STOP_MARGIN_S,
                         "keepalive": 5, "accesslog": None, "loglevel": "warning"}.items():
                self.cfg.set(k, v)
            if on_exit is not None:
                self.cfg.set("on_exit", lambda server: on_exit())

        def load(self):
            return app_factory()  # runs in the worker, after fork: engine threads live there

    _App().run()
