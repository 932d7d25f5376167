"""The serving logic of /v1/completions and /v1/chat/completions on an Engine (HTTP-agnostic)."""

from __future__ import annotations

import json
import queue
import time
import uuid
from typing import Any, Iterator

from serve.adapters import AdapterSync
from serve.engines.base import Engine, GenRequest
from serve.errors import APIError, bad_request
from serve.metrics import Metrics
from serve.protocol import ChatCompletionRequest, CompletionRequest

EVENT_TIMEOUT_S = 600  # a request that sees no token for this long is failed, never left hanging


class OpenAIServing:
    def __init__(self, engine: Engine, sync: AdapterSync | None, metrics: Metrics):
        self.engine = engine
        self.sync = sync
        self.metrics = metrics

    # -- models --------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        created = int(time.time())
        data = [{"id": self.engine.model_name, "object": "model", "created": created, "owned_by": "tunestack",
                 "root": self.engine.model_name, "parent": None}]
        for name in self.sync.loaded() if self.sync else []:
            data.append({"id": name, "object": "model", "created": created, "owned_by": "tunestack",
                         "root": name, "parent": self.engine.model_name})
        return {"object": "list", "data": data}

    def resolve(self, model: str) -> str | None:
        if model == self.engine.model_name:
            return None
        if self.sync and model in self.sync.loaded():
            return model
        raise APIError(404, f"The model '{model}' does not exist", "model", "model_not_found")

    # -- generation ------------------------------------------------------------------
    def _prepare(self, req, prompt_ids: list[int]) -> list[GenRequest]:
        adapter = self.resolve(req.model)
        room = self.engine.max_model_len - len(prompt_ids)
        if not req.max_tokens_given and isinstance(req, ChatCompletionRequest):
            req.params.max_tokens = max(1, min(req.params.max_tokens, room))
        if len(prompt_ids) + req.params.max_tokens > self.engine.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.engine.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + req.params.max_tokens} tokens ({len(prompt_ids)} in the messages, "
                f"{req.params.max_tokens} in the completion).", "max_tokens", "context_length_exceeded")
        events: queue.Queue = queue.Queue()
        gens = []
        for i in range(req.n):
            p = req.params
            if p.seed is not None and req.n > 1:
                p = type(p)(**{**p.__dict__, "seed": p.seed + i})  # distinct but reproducible choices
            gens.append(GenRequest(prompt_ids, adapter, p, events=events, index=i))
        return gens

    def completions(self, body: Any) -> tuple[CompletionRequest, list[GenRequest]]:
        req = CompletionRequest.parse(body)
        return req, self._prepare(req, self.engine.tokenize(req.prompt))

    def chat(self, body: Any) -> tuple[ChatCompletionRequest, list[GenRequest]]:
        req = ChatCompletionRequest.parse(body)
        try:
            ids = self.engine.tokenize_chat(req.messages)
        except Exception as e:  # a template that rejects the message order is the client's input
            raise bad_request(f"messages could not be formatted with the chat template: {e}", "messages") from None
        return req, self._prepare(req, ids)

    def run(self, gens: list[GenRequest]) -> Iterator[tuple]:
        """Submit and yield engine events until every choice is done. Closing the iterator cancels."""
        for g in gens:
            self.engine.submit(g)
        pending = len(gens)
        events = gens[0].events
        try:
            while pending:
                try:
                    ev = events.get(timeout=EVENT_TIMEOUT_S)
                except queue.Empty:
                    raise APIError(503, "generation timed out", code="timeout") from None
                if ev[1] in ("done", "error"):
                    pending -= 1
                yield ev
        finally:
            for g in gens:
                g.cancelled.set()

    def record(self, req, gens: list[GenRequest], status: int, completion_tokens: int, t0: float) -> None:
        m = self.metrics
        adapter = gens[0].adapter if gens else ""
        lab = (req.model, adapter or "")
        m.requests.labels(*lab, str(status)).inc()
        if status != 200 or not gens:
            return
        m.prompt_tokens.labels(*lab).inc(len(gens[0].prompt_ids) * len(gens))
        m.generation_tokens.labels(*lab).inc(completion_tokens)
        end = time.perf_counter()
        m.e2e.labels(*lab).observe(end - t0)
        first = min((g.first_token_at for g in gens if g.first_token_at), default=None)
        if first is not None:
            m.ttft.labels(*lab).observe(first - t0)
            per_choice = completion_tokens / max(1, len(gens))
            if per_choice > 1:
                m.tpot.labels(*lab).observe((end - first) / (per_choice - 1))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

