"""The drain: HTTP requests in progress, and the draining flag that SIGTERM sets (process/gunicorn.py)."""

from __future__ import annotations

import threading
from typing import Any, Callable

DRAIN_KEY = "tunestack.drain"  # where an app keeps its Drain (app.extensions), for the worker to find


class Drain:
    """HTTP requests in progress, and the draining flag that SIGTERM sets (gunicorn.DrainingWorker).

    While draining, /ready is 503 and new API requests get 503 "draining"; the worker stops once no
    request is in progress or after `seconds`. Any process serving this app can drive it: begin(), then
    wait_idle(seconds), then stop."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.draining = False  # a plain attribute: a signal handler may set it without taking a lock
        self._active = 0
        self._idle = threading.Condition()

    def begin(self) -> None:
        self.draining = True

    @property
    def active(self) -> int:
        return self._active

    def enter(self) -> Callable[[], None]:
        """Count a request in; the returned release counts it out (once, however often it is called)."""
        with self._idle:
            self._active += 1
        done = []

        def release() -> None:
            with self._idle:
                if not done:
                    done.append(True)
                    self._active -= 1
                    self._idle.notify_all()
        return release

    def wait_idle(self, timeout: float) -> bool:
        """True once no request is in progress; False if `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)



def drain_of(app: Any) -> Drain | None:
    """The Drain an app keeps under DRAIN_KEY (None for any other WSGI app)."""
    drain = getattr(app, "extensions", {}).get(DRAIN_KEY)
    return drain if isinstance(drain, Drain) else None
