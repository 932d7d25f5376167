"""glibc malloc arenas: capped at start-up, so memory stays flat under many request threads (issue 28, item 7).

glibc gives each new thread an arena of its own, up to 8 per core, and keeps what each arena
once held. gunicorn's 64 HTTP threads, torch's and the batch thread so spread their allocations over many
arenas, and resident memory keeps creeping up under sustained load (bench/soak.py measures it).
`mallopt(M_ARENA_MAX, n)` bounds them; called before the threads start, as MALLOC_ARENA_MAX would be.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("serve")
M_ARENA_MAX = -8  # glibc's malloc.h


def cap_malloc_arenas(arenas: int, libc: object | None = None) -> bool:
    """Cap glibc's malloc arenas at `arenas` (0: leave glibc's default). True when the cap took effect.

    Elsewhere (musl, macOS: no mallopt, or it refuses the parameter) this is a no-op with a log line."""
    if arenas <= 0:
        return False
    libc = _libc() if libc is None else libc
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        log.info("SERVE_MALLOC_ARENAS=%d: this C library has no mallopt (not glibc); its allocator is left as is", arenas)
        return False
    if mallopt(M_ARENA_MAX, arenas) != 1:
        log.info("SERVE_MALLOC_ARENAS=%d: mallopt refused M_ARENA_MAX; the allocator is left as is", arenas)
        return False
    return True


def _libc() -> object | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:  # no loadable C library by that name
        return None
