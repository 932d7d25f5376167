"""The Flask backend's serving layer: OpenAI request -> engine sequences -> OpenAI response (HTTP-agnostic).

OpenAIServing implements `Backend` over an in-process Engine (TorchEngine or OrtEngine) and records
the request metrics; the app only frames what it returns.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Generator, Iterator, Union

from serve.adapters import AdapterSync
from serve.backend import EventStream, JSONReply, Reply, ServedModels, json_body
from serve.engines.base import Engine, EngineEvent, EngineStats, Failed, Finished, GenRequest, TextDelta
from serve.errors import APIError, bad_request
from serve.metrics import Metrics
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.responses import ResponseBuilder, model_list, usage

EVENT_TIMEOUT_S = 600  # a request that sees no token for this long is failed, never left hanging

Request = Union[CompletionRequest, ChatCompletionRequest]


@dataclass
class Job:
    """One API request in the engine: the parsed request, its n sequences, its response builder and clock."""

    req: Request
    gens: list[GenRequest]
    out: ResponseBuilder
    t0: float

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return usage(len(self.gens[0].prompt_ids) * len(self.gens), completion_tokens)


class OpenAIServing:
    """The Backend over an Engine: parse, check, submit, and shape the engine's events into responses."""

    def __init__(self, engine: Engine, sync: AdapterSync | None, metrics: Metrics):
        self.engine = engine
        self.sync = sync
        self.metrics = metrics
        self.served = ServedModels(engine.model_name, sync)

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def is_served(self, model: object) -> bool:
        return self.served.is_served(model)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def models(self) -> JSONReply:
        sync = self.sync
        return JSONReply(model_list(self.model_name, sync.loaded() if sync else [], int(time.time()),
                                    sync.evidence() if sync else None))

    # -- generation ------------------------------------------------------------------
    def completions(self, raw_body: bytes) -> Reply:
        return self._generate(raw_body, chat=False)

    def chat_completions(self, raw_body: bytes) -> Reply:
        return self._generate(raw_body, chat=True)

    def _generate(self, raw_body: bytes, chat: bool) -> Reply:
        t0 = time.perf_counter()
        self.metrics.in_flight.inc()  # decremented once the request is rejected, answered or its stream closed
        job = self._start(raw_body, chat, t0)
        return EventStream(self._stream(job)) if job.req.stream else self._complete(job)

    def _start(self, raw_body: bytes, chat: bool, t0: float) -> Job:
        """Parse and check the request and build its sequences; a rejection is counted here."""
        body = None
        try:
            body = json_body(raw_body)
            req, ids = self._parse_chat(body) if chat else self._parse_completion(body)
            gens = self._sequences(req, ids)
        except APIError as e:
            self.metrics.in_flight.dec()
            model = body.get("model") if isinstance(body, dict) else None
            self.metrics.requests.labels(self.served.label(model), "", str(e.status)).inc()
            raise
        return Job(req, gens, ResponseBuilder(chat, req.model, req.include_usage), t0)

    def _parse_completion(self, body: Any) -> tuple[CompletionRequest, list[int]]:
        req = CompletionRequest.parse(body)
        ids = self.engine.tokenize(req.prompt)
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        return req, ids

    def _parse_chat(self, body: Any) -> tuple[ChatCompletionRequest, list[int]]:
        req = ChatCompletionRequest.parse(body)
        try:
            return req, self.engine.tokenize_chat(req.messages)
        except Exception as e:  # a template that rejects the message order is the client's input
            raise bad_request(f"messages could not be formatted with the chat template: {e}", "messages") from None

    def _sequences(self, req: Request, prompt_ids: list[int]) -> list[GenRequest]:
        """The request's n engine sequences, after the model (404) and context length (400) checks."""
        adapter = self.served.adapter(req.model)
        self._fit_context(req, len(prompt_ids))
        events: queue.Queue[EngineEvent] = queue.Queue()  # one queue for the n choices
        gens = []
        for i in range(req.n):
            p = req.params
            if p.seed is not None and req.n > 1:
                p = dataclasses.replace(p, seed=p.seed + i)  # distinct but reproducible choices
            gens.append(GenRequest(prompt_ids, adapter, p, events=events, index=i))
        return gens

    def _fit_context(self, req: Request, n_prompt: int) -> None:
        limit = self.engine.max_model_len
        if not req.max_tokens_given and isinstance(req, ChatCompletionRequest):
            req.params.max_tokens = max(1, min(req.params.max_tokens, limit - n_prompt))  # chat: up to the room left
        if n_prompt + req.params.max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + req.params.max_tokens} tokens ({n_prompt} in the messages, "
                f"{req.params.max_tokens} in the completion).", "max_tokens", "context_length_exceeded")

    def _complete(self, job: Job) -> JSONReply:
        """Wait for every choice and answer with the whole response."""
        try:
            with closing(self.run(job.gens)) as events:
                texts, reasons, completion = _collect(events, job.req.n)
            self.record(job, 200, completion)
            return JSONReply(job.out.body(texts, reasons, job.usage(completion)))
        except APIError as e:
            self.record(job, e.status, 0)
            raise
        finally:
            self.metrics.in_flight.dec()

    def _stream(self, job: Job) -> Generator[dict[str, Any], None, None]:
        """The chunks of a streamed response. Closing it early (the client left) cancels the rows: status 499."""
        completion, status = 0, 200
        try:
            if job.out.chat:
                yield job.out.role_chunk(job.req.n)
            with closing(self.run(job.gens)) as events:
                try:
                    for ev in events:
                        if isinstance(ev, TextDelta):
                            yield job.out.text_chunk(ev.index, ev.text)
                        elif isinstance(ev, Finished):
                            completion += ev.completion_tokens
                            yield job.out.finish_chunk(ev.index, ev.reason)
                        else:
                            raise APIError(503, ev.message, code="engine_error")
                except APIError as e:  # headers are sent: the error goes out as an event, the stream ends cleanly
                    status = e.status
                    yield e.body()
            if job.req.include_usage:
                yield job.out.usage_chunk(job.usage(completion))
        except GeneratorExit:
            status = 499
            raise
        finally:
            self.record(job, status, completion)
            self.metrics.in_flight.dec()

    def run(self, gens: list[GenRequest]) -> Generator[EngineEvent, None, None]:
        """Submit and yield engine events until every choice has ended. Closing the iterator cancels."""
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
                if isinstance(ev, (Finished, Failed)):
                    pending -= 1
                yield ev
        finally:
            for g in gens:
                g.cancelled.set()

    def record(self, job: Job, status: int, completion_tokens: int) -> None:
        first = min((g.first_token_at for g in job.gens if g.first_token_at), default=None)
        labels = (job.req.model, job.gens[0].adapter or "")
        self.metrics.record_request(labels, status, job.t0, job.usage(completion_tokens) if status == 200 else None,
                                    first, choices=len(job.gens))


def _collect(events: Iterator[EngineEvent], n: int) -> tuple[list[str], list[str], int]:
    """(texts, finish reasons, completion tokens) of n choices; 503 on an engine error."""
    texts, reasons, completion = [""] * n, ["stop"] * n, 0
    for ev in events:
        if isinstance(ev, TextDelta):
            texts[ev.index] += ev.text
        elif isinstance(ev, Finished):
            reasons[ev.index], completion = ev.reason, completion + ev.completion_tokens
        else:
            raise APIError(503, ev.message, code="engine_error")
    return texts, reasons, completion
