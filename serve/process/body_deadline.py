"""Request bodies under a deadline and a size limit, and every request counted by the drain until its
response is closed: WSGI middleware for gunicorn's blocking sockets."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from typing import Any, Callable

from werkzeug.exceptions import RequestEntityTooLarge, RequestTimeout
from werkzeug.wsgi import ClosingIterator

from serve.process.drain import Drain
from serve.settings import Settings


class _Watchdog:
    """One daemon thread that calls each watched callback at its deadline, unless cancelled first."""

    def __init__(self) -> None:
        self._due: dict[int, tuple[float, Callable[[], None]]] = {}
        self._keys = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None  # started on first use: in gunicorn's worker, after fork

    def watch(self, deadline: float, callback: Callable[[], None]) -> int:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="body-deadline", daemon=True)
                self._thread.start()
            key = next(self._keys)
            self._due[key] = (deadline, callback)
            self._cv.notify()
            return key

    def cancel(self, key: int) -> None:
        with self._cv:
            self._due.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._cv:
                now = time.monotonic()
                fired = [self._due.pop(k)[1] for k, (d, _) in list(self._due.items()) if d <= now]
                if not fired:  # at most one entry per HTTP thread: a scan is cheap
                    self._cv.wait(min((d for d, _ in self._due.values()), default=now + 60) - now)
            for callback in fired:
                callback()


BODY_WATCHDOG = _Watchdog()


class DeadlineInput:
    """wsgi.input with one deadline for the whole body (then 408) and a size limit (then 413).

    gunicorn reads a body from a blocking socket with no timeout, and one read() loops over many recv()s,
    so neither a socket timeout nor a check between reads stops a client that sends its headers and then
    trickles the body (or stops). At the deadline the watchdog shuts the socket's read side: the blocked
    recv() returns, and the request is answered 408 on the still open write side.

    The limit is checked here too: werkzeug stops a chunked body (no Content-Length) at the limit
    without an error, so a larger one would be cut silently and parsed as if it were whole."""

    def __init__(self, stream: Any, sock: socket.socket | None, seconds: float, length: int | None, limit: int):
        self._stream, self._sock, self._seconds, self._length, self._limit = stream, sock, seconds, length, limit
        self._deadline = time.monotonic() + seconds
        self._got = 0
        self._lock = threading.Lock()
        self._expired = self._done = False
        self._watch: int | None = None

    def read(self, *size: int) -> bytes:
        return self._bounded(self._stream.read, *size)

    def readline(self, *size: int) -> bytes:
        return self._bounded(self._stream.readline, *size)

    def finish(self) -> None:
        """The body is read (or the response is done): stop watching it."""
        with self._lock:
            self._done = True
            if self._watch is not None:
                BODY_WATCHDOG.cancel(self._watch)

    def _bounded(self, read: Callable[..., bytes], *size: int) -> bytes:
        if self._expired or time.monotonic() >= self._deadline:
            raise self._timeout()
        with self._lock:
            if self._sock is not None and self._watch is None and not self._done:
                self._watch = BODY_WATCHDOG.watch(self._deadline, self._expire)
        try:
            data = read(*size)
        except Exception:
            if self._expired:
                raise self._timeout() from None
            raise
        if self._expired:
            raise self._timeout()
        self._got += len(data)
        if self._got > self._limit:
            self.finish()
            raise RequestEntityTooLarge()
        if not data or (self._length is not None and self._got >= self._length):
            self.finish()
        return data

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._expired = True
            try:
                self._sock.shutdown(socket.SHUT_RD)  # type: ignore[union-attr]
            except OSError:  # the client is already gone
                pass

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(f"request body not received within {self._seconds:g} s")


def counted_with_deadline(wsgi_app: Callable, drain: Drain, settings: Settings) -> Callable:
    """WSGI middleware: every request counts as in progress until its response is closed (streams
    included); its body must arrive within body_timeout and fit max_body_bytes."""
    def counted(environ: dict, start_response: Callable) -> Any:
        length = environ.get("CONTENT_LENGTH")
        upload = environ.get("PATH_INFO") == "/v1/files" and environ.get("REQUEST_METHOD") == "POST"
        body_in = DeadlineInput(environ["wsgi.input"], environ.get("gunicorn.socket"),
                                settings.upload_timeout if upload else settings.body_timeout,
                                int(length) if length and length.isdigit() else None,
                                settings.max_upload_bytes if upload else settings.max_body_bytes)
        environ["wsgi.input"] = body_in
        release = drain.enter()
        try:
            body = wsgi_app(environ, start_response)
        except BaseException:
            release()
            body_in.finish()
            raise
        return ClosingIterator(body, [release, body_in.finish])  # closed by the server once sent or abandoned
    return counted
