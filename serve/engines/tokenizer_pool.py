"""Tokenizer copies lent to one thread at a time, so that HTTP threads never share a fast tokenizer.

A transformers fast tokenizer is one Rust object behind a runtime borrow check: a call that changes
its state (truncation, padding, special-token splitting) while another thread is inside encode (which
releases the GIL) raises "RuntimeError: Already borrowed" (huggingface/tokenizers#537). The engine
thread keeps the original for decoding; every HTTP thread borrows a copy from this pool.
"""

from __future__ import annotations

import copy
import queue
import threading
from contextlib import contextmanager
from typing import Any, Iterator

COPIES = 4  # encoding a prompt takes milliseconds: 4 copies serve 64 HTTP threads without a copy (MBs) each


class TokenizerPool:
    def __init__(self, tok: Any, size: int = COPIES):
        self._proto = tok
        self._size = size
        self._made = 0
        self._idle: queue.LifoQueue = queue.LifoQueue()  # the warmest copy first
        self._lock = threading.Lock()

    @contextmanager
    def lend(self) -> Iterator[Any]:
        """A tokenizer no other thread uses until the block ends."""
        tok = self._take()
        try:
            yield tok
        finally:
            self._idle.put(tok)

    def _take(self) -> Any:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._made < self._size:
                self._made += 1
                return copy.deepcopy(self._proto)  # deepcopy only reads the original: safe beside its user
        return self._idle.get()
