"""OpenAI response bodies: text_completion, chat.completion, their stream chunks, usage.

Whole responses are built as the pydantic response models of protocol.py (the ones /openapi.json
publishes), so a body cannot leave the server in a shape the spec does not describe. Stream chunks,
one per token and row, are plain dicts on the hot path; tests/serve/test_openapi.py validates
them against the same models' schemas.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from serve.openai.protocol import (ChatCompletionMessage, ChatCompletionResponse, ChatCompletionResponseChoice,
                            CompletionResponse, CompletionResponseChoice, ModelCard, ModelList, UsageInfo)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class ResponseBuilder:
    """The bodies of one API request: every chunk carries the same id, created time and model."""

    chat: bool
    model: str
    include_usage: bool = False  # streams: a usage field on every chunk, and a final usage-only chunk
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", new_id("chatcmpl" if self.chat else "cmpl"))

    # -- a whole response ---------------------------------------------------------
    def body(self, texts: list[str], reasons: list[str], usage_obj: dict[str, int]) -> dict[str, Any]:
        head = {"id": self.id, "created": self.created, "model": self.model, "usage": UsageInfo(**usage_obj)}
        pairs = list(enumerate(zip(texts, reasons)))
        if self.chat:
            return ChatCompletionResponse(object="chat.completion", **head, choices=[
                ChatCompletionResponseChoice(index=i, message=ChatCompletionMessage(role="assistant", content=text),
                                             logprobs=None, finish_reason=reason)
                for i, (text, reason) in pairs]).model_dump()
        return CompletionResponse(object="text_completion", **head, choices=[
            CompletionResponseChoice(index=i, text=text, logprobs=None, finish_reason=reason)
            for i, (text, reason) in pairs]).model_dump()

    # -- stream chunks --------------------------------------------------------------
    def role_chunk(self, n: int) -> dict[str, Any]:
        """A chat stream's first chunk: the assistant role for each of the n choices."""
        return self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in range(n)])

    def text_chunk(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk([self._delta(index, text, None)])

    def finish_chunk(self, index: int, reason: str) -> dict[str, Any]:
        return self._chunk([self._delta(index, None, reason)])

    def usage_chunk(self, usage_obj: dict[str, int]) -> dict[str, Any]:
        """The last chunk when the client asked for stream_options.include_usage: no choices, the usage."""
        return self._chunk([], usage_obj)

    def _delta(self, index: int, text: str | None, reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}

    def _chunk(self, choices: list[dict[str, Any]], usage_obj: dict[str, int] | None = None) -> dict[str, Any]:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            out["usage"] = usage_obj
        return out


def model_list(base: str, adapters: list[str], created: int,
               evidence: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """/v1/models: the base model, then each served adapter with the base as its parent (and its evidence)."""
    evidence = evidence or {}
    cards = [ModelCard(id=base, object="model", created=created, owned_by="tunestack", root=base, parent=None)]
    cards += [ModelCard(id=a, object="model", created=created, owned_by="tunestack", root=a, parent=base,
                        **evidence.get(a, {})) for a in adapters]
    return ModelList(object="list", data=cards).model_dump()
