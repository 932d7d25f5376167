"""serve/process/malloc.py: glibc's malloc arenas capped at start-up (SERVE_MALLOC_ARENAS), a no-op elsewhere."""

from __future__ import annotations

import logging
import platform
import subprocess
import sys
import textwrap

import pytest

from serve.process.malloc import cap_malloc_arenas
from serve.settings import Settings

# 8 threads alive at once, each allocating through malloc (64 KiB: above pymalloc, below the mmap threshold);
# then glibc's malloc_stats() prints one "Arena N:" block per arena on stderr.
PROBE = textwrap.dedent("""
    import ctypes, sys, threading
    from serve.process.malloc import cap_malloc_arenas
    print(cap_malloc_arenas(int(sys.argv[1])), flush=True)
    gate = threading.Barrier(8)
    def work():
        gate.wait()
        held = [bytearray(1 << 16) for _ in range(20)]
        gate.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    ctypes.CDLL(None).malloc_stats()
""")


def arenas_used(cap: int) -> tuple[str, int]:
    p = subprocess.run([sys.executable, "-c", PROBE, str(cap)], capture_output=True, text=True, timeout=60, check=True)
    return p.stdout.strip(), sum(line.startswith("Arena ") for line in p.stderr.splitlines())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="M_ARENA_MAX is glibc's; the fallback is tested below")
def test_the_cap_bounds_the_arenas_threads_get_on_glibc():
    applied, arenas = arenas_used(0)  # control: uncapped, each of the 8 threads gets its own arena (up to 8 per core)
    assert applied == "False" and arenas > 2
    applied, arenas = arenas_used(2)
    assert applied == "True" and arenas == 2


class NoMallopt:
    """A C library without mallopt (musl, macOS)."""


class RefusingLibc:
    def mallopt(self, param: int, value: int) -> int:
        return 0


def test_without_mallopt_it_is_a_logged_no_op(caplog):
    with caplog.at_level(logging.INFO, logger="serve"):
        assert cap_malloc_arenas(2, NoMallopt()) is False
        assert cap_malloc_arenas(2, RefusingLibc()) is False
    assert "no mallopt (not glibc)" in caplog.text and "mallopt refused M_ARENA_MAX" in caplog.text


def test_zero_leaves_the_allocator_alone_and_negative_is_refused():
    assert cap_malloc_arenas(0, RefusingLibc()) is False
    assert Settings.from_env({}).malloc_arenas == 2
    assert Settings.from_env({"SERVE_MALLOC_ARENAS": "0"}).malloc_arenas == 0
    with pytest.raises(ValueError, match="SERVE_MALLOC_ARENAS"):
        Settings.from_env({"SERVE_MALLOC_ARENAS": "-1"})
