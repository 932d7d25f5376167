"""The WSGI server's process: gunicorn's gthread worker with a drain on SIGTERM, one worker per server; its
header and request line limits answer 431 and 414 with OpenAI-style bodies (both backends)."""

from __future__ import annotations

import json
import logging
import math
import threading

from gunicorn import util
from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.workers.gthread import ThreadWorker

from serve.errors import APIError
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

    def handle_error(self, req, client, addr, exc) -> None:
        """gunicorn refuses oversized headers (431) and request lines (414) before the app sees them, with an
        HTML page: answer with an OpenAI-style body instead. Every other error is gunicorn's as before."""
        if not isinstance(exc, (LimitRequestHeaders, LimitRequestLine)):
            return super().handle_error(req, client, addr, exc)
        if isinstance(exc, LimitRequestHeaders):
            status, reason = 431, "Request Header Fields Too Large"
            message = (f"request headers too large ({exc}): at most {self.cfg.limit_request_fields} fields of "
                       f"{self.cfg.limit_request_field_size} bytes each")
        else:
            status, reason = 414, "URI Too Long"
            message = f"request line too long ({exc}): at most {self.cfg.limit_request_line} bytes"
        self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
        body = json.dumps(APIError(status, message, code="request_too_large").body()).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        try:
            util.write_nonblock(client, head + body)
        except Exception:  # noqa: BLE001 - the client may be gone already, as gunicorn's own error page
            self.log.debug("Failed to send error message.")


def run_gunicorn(app_factory, settings: Settings, on_exit=None) -> None:
    from gunicorn.app.base import BaseApplication

    class _App(BaseApplication):
        def load_config(self):
            for k, v in {"bind": f"{settings.host}:{settings.port}", "workers": 1,
                         "worker_class": "serve.process.gunicorn.DrainingWorker", "threads": settings.http_threads,
                         "timeout": 300, "graceful_timeout": math.ceil(settings.drain_seconds) + STOP_MARGIN_S,
                         "keepalive": 5, "accesslog": None, "loglevel": "warning",
                         "limit_request_field_size": settings.max_header_bytes}.items():
                self.cfg.set(k, v)
            if on_exit is not None:
                self.cfg.set("on_exit", lambda server: on_exit())

        def load(self):
            return app_factory()  # runs in the worker, after fork: engine threads live there

    _App().run()
