"""Incremental detokenization: each decode step turns a row's new token into text at a bounded cost.

Decoding a row's whole output on every step costs O(length) per step, O(length^2) per request.
Instead each step decodes two short windows of the row's tokens (vLLM's detokenize_incrementally,
HF's TextStreamer):

    ids:   ... settled ... [prefix ........ read) [new tokens ...]
    new text = decode(ids[prefix:]) minus decode(ids[prefix:read])

The window starts a few tokens back so that a token is decoded in context (SentencePiece drops the
leading space of a window's first token; byte-level BPE splits characters over tokens). Text that
ends in U+FFFD is an unfinished UTF-8 character: the offsets wait for the token that completes it.
The concatenated text equals tokenizer.decode(all ids, skip_special_tokens=True) (tested).
"""

from __future__ import annotations

from typing import Any

MAX_PENDING = 8  # tokens an unfinished character may wait for: one character is at most 4 bytes
PROBE = "a . ,"  # text whose decoding a space-cleaning tokenizer changes (" ." -> ".")


def cleans_up_spaces(tok: Any) -> bool:
    """Whether decode rewrites text across token boundaries (clean_up_tokenization_spaces on a WordPiece or
    Unigram tokenizer): such a tokenizer cannot be decoded by windows, so it keeps whole-output decoding."""
    ids = list(tok(PROBE, add_special_tokens=False)["input_ids"])
    return tok.decode(ids, skip_special_tokens=True) != PROBE


class Detokenizer:
    """One row's text, a step at a time. `step` returns the text the latest tokens settle."""

    def __init__(self, tok: Any, whole: bool = False):
        """whole: decode the whole output each step (tokenizers for which cleans_up_spaces is True)."""
        self.tok = tok
        self.whole = whole
        self.prefix = 0  # first token of the context window
        self.read = 0  # tokens whose text has been returned
        self.done = 0  # whole mode: characters returned

    def step(self, ids: list[int], final: bool = False) -> str:
        """The new settled text of `ids` (the row's output so far). final: the row ends, flush everything."""
        if self.whole:
            return self._whole(ids, final)
        if len(ids) == self.read:
            return ""
        before = self._decode(ids[self.prefix:self.read])
        text = self._decode(ids[self.prefix:])
        waiting = len(text) <= len(before) or text.endswith("\ufffd")  # nothing yet, or half a character
        if waiting and not final and len(ids) - self.prefix <= MAX_PENDING:
            return ""
        self.prefix, self.read = self.read, len(ids)
        return text[len(before):]

    def _whole(self, ids: list[int], final: bool) -> str:
        text = self._decode(ids)
        if not final and text.endswith("\ufffd"):
            text = text[:-1]
        new = text[self.done:]
        self.done = max(self.done, len(text))
        return new

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if ids else ""
