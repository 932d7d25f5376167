"""Stop strings in streamed text: where one starts, and how much text is safe to send before it is known."""

from __future__ import annotations


def find_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string starts in text, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def emit_safe_len(text: str, stops: list[str]) -> int:
    """How much of text can be sent now: not a trailing half character (U+FFFD) nor a tail that may begin a stop string."""
    n = len(text)
    if text.endswith("\ufffd"):
        n -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                hold = max(hold, k)
                break
    return n - hold
