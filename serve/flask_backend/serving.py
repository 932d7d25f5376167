"""The Flask backend's serving layer: OpenAI request -> engine sequences -> OpenAI response (HTTP-agnostic).

OpenAIServing implements `Backend` over an in-process Engine (TorchEngine or OrtEngine) and records
the request metrics; the app only frames what it returns.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Generator, Iterator, Union

from serve.registry_sync import AdapterSync
from serve.openai.backend import EventStream, JSONReply, Reply, ServedModels, json_body
from serve.engines.base import Engine, EngineEvent, EngineStats, Failed, Finished, GenRequest, TextDelta
from serve.errors import APIError, bad_request
from serve.metrics import Metrics
from serve.openai.protocol import ChatCompletionRequest, CompletionRequest
from serve.openai.responses import ResponseBuilder, model_list, usage

EVENT_TIMEOUT_S = 600  # a request that sees no token for this long is failed, never left hanging
INTERNAL = APIError(500, "internal error")  # what a client sees of a bug: the traceback goes to the log only
log = logging.getLogger("serve.flask_backend.serving")

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

    def __init__(self, engine: Engine, sync: AdapterSync | None, metrics: Metrics,
                 event_timeout_s: float = EVENT_TIMEOUT_S):
        self.engine = engine
        self.sync = sync
        self.metrics = metrics
        self.served = ServedModels(engine.model_name, sync)
        self.event_timeout_s = event_timeout_s

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
        """The in-flight gauge is up from here until this returns, unless a started stream took it over:
        a started generator's `finally` runs when it is closed or collected, so no path can leak it."""
        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        handed_over = False
        try:
            job = self._start(raw_body, chat, t0)
            if not job.req.stream:
                return self._complete(job)
            stream = self._stream(job)
            next(stream)  # runs to the stream's first yield, inside its try: it owns the gauge now
            handed_over = True
            return EventStream(stream)
        finally:
            if not handed_over:
                self.metrics.in_flight.dec()

    def _start(self, raw_body: bytes, chat: bool, t0: float) -> Job:
        """Parse and check the request and build its sequences; a rejection is counted here."""
        body = None
        try:
            body = json_body(raw_body)
            req, ids = self._parse_chat(body) if chat else self._parse_completion(body)
            gens = self._sequences(req, ids)
        except Exception as e:
            status = e.status if isinstance(e, APIError) else 500
            model = body.get("model") if isinstance(body, dict) else None
            self.metrics.requests.labels(self.served.label(model), "", str(status)).inc()
            raise
        return Job(req, gens, ResponseBuilder(chat, req.model, req.include_usage), t0)

    def _parse_completion(self, body: Any) -> tuple[CompletionRequest, list[int]]:
        req = CompletionRequest.parse(body)
        if not req.prompt:  # checked on the text: a tokenizer that adds BOS makes "" a non-empty id list
            raise bad_request("prompt must not be empty", "prompt")
        ids = self.engine.tokenize(req.prompt)
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        return req, ids

    def _parse_chat(self, body: Any) -> tuple[ChatCompletionRequest, list[int]]:
        from jinja2 import TemplateError

        req = ChatCompletionRequest.parse(body)
        try:
            return req, self.engine.tokenize_chat(req.messages)
        except (TemplateError, ValueError) as e:  # a template that rejects the message order: the client's input
            # (any other error is the server's: a 500, never blamed on the messages)
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
        except Exception as e:
            self.record(job, e.status if isinstance(e, APIError) else 500, 0)
            raise

    def _stream(self, job: Job) -> Generator[dict[str, Any], None, None]:
        """The chunks of a streamed response, after one priming yield of {} that _generate consumes.

        Closing it early (the client left) cancels the rows: status 499. An error after the headers
        went out (a timeout, an engine failure, a bug) is sent as an error event and ends the stream."""
        completion, status = 0, 200
        try:
            yield {}  # priming: from here on the finally below owns the in-flight gauge
            if job.out.chat:
                yield job.out.role_chunk(job.req.n)
            try:
                with closing(self._stream_events(job)) as chunks:  # closing it cancels the rows at once
                    for chunk, tokens in chunks:
                        completion += tokens
                        yield chunk
            except Exception as e:  # noqa: BLE001 - headers are sent: the error goes out as an event
                if not isinstance(e, APIError):
                    log.exception("stream failed")
                err = e if isinstance(e, APIError) else INTERNAL
                status = err.status
                yield err.body()
                return
            if job.req.include_usage:
                yield job.out.usage_chunk(job.usage(completion))
        except GeneratorExit:
            status = 499
            raise
        finally:
            self.record(job, status, completion)
            self.metrics.in_flight.dec()

    def _stream_events(self, job: Job) -> Iterator[tuple[dict[str, Any], int]]:
        """(chunk, completion tokens it finishes) for each engine event; an engine failure raises (failure())."""
        with closing(self.run(job.gens)) as events:
            for ev in events:
                if isinstance(ev, TextDelta):
                    yield job.out.text_chunk(ev.index, ev.text), 0
                elif isinstance(ev, Finished):
                    yield job.out.finish_chunk(ev.index, ev.reason), ev.completion_tokens
                else:
                    raise failure(ev)

    def run(self, gens: list[GenRequest]) -> Generator[EngineEvent, None, None]:
        """Submit and yield engine events until every choice has ended. Closing the iterator cancels."""
        for g in gens:
            self.engine.submit(g)
        pending = len(gens)
        events = gens[0].events
        try:
            while pending:
                try:
                    ev = events.get(timeout=self.event_timeout_s)
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
    """(texts, finish reasons, completion tokens) of n choices; an engine failure raises (failure())."""
    texts, reasons, completion = [""] * n, ["stop"] * n, 0
    for ev in events:
        if isinstance(ev, TextDelta):
            texts[ev.index] += ev.text
        elif isinstance(ev, Finished):
            reasons[ev.index], completion = ev.reason, completion + ev.completion_tokens
        else:
            raise failure(ev)
    return texts, reasons, completion


def failure(ev: Failed) -> APIError:
    """An engine failure as the client sees it: its adapter gone from the registry while it waited is a 404,
    as for a model never served; any other failure a 503 (the request was valid)."""
    if ev.not_found:
        return APIError(404, ev.message, "model", "model_not_found")
    return APIError(503, ev.message, code="engine_error")
