"""What an engine offers the serving layer: submit a request, receive its events on a queue."""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Union


@dataclass
class SamplingParams:
    max_tokens: int = 16  # OpenAI's completions default
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # vLLM extension: generate exactly max_tokens (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


# -- events: what the engine puts on a request's queue, tagged with the choice index ------------
@dataclass(frozen=True)
class TextDelta:
    """New text of choice `index` (whole characters; never part of a stop string)."""

    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    """Choice `index` ended normally: finish_reason "stop" or "length"."""

    index: int
    reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """Choice `index` ended in an engine error (503) or, `not_found`, because its adapter left the registry
    while it waited (404 model_not_found, as a request naming an unknown model); the message is safe to show."""

    index: int
    message: str
    not_found: bool = False


EngineEvent = Union[TextDelta, Finished, Failed]
"""A request's events: TextDelta*, then exactly one Finished or Failed."""


@dataclass(frozen=True)
class EngineStats:
    """Sequences in the running batch and sequences waiting for a slot (the /metrics gauges)."""

    running: int = 0
    waiting: int = 0


@dataclass
class GenRequest:
    """One sequence to generate. The engine puts EngineEvents on `events`, tagged with `index` (the choice)."""

    prompt_ids: list[int]
    adapter: str | None  # None = base model
    params: SamplingParams
    events: queue.Queue[EngineEvent] = field(default_factory=queue.Queue)  # shared by the n choices of one request
    index: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    ended: bool = False  # set by the engine with the last event: the serving layer counts one per choice


class Engine(ABC):
    """An engine runs its model on its own thread; every method here is thread-safe."""

    model_name: str
    max_model_len: int

    @abstractmethod
    def submit(self, req: GenRequest) -> None:
        """Queue a request; events arrive on req.events."""

    @abstractmethod
    def load_adapter(self, name: str, path: str) -> None:
        """Load (or replace) an adapter; raises on failure."""

    @abstractmethod
    def unload_adapter(self, name: str) -> None:
        """Unload an adapter once no running sequence uses it."""

    @abstractmethod
    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids for a chat request (chat template + generation prompt)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Prompt ids for a completion request."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """Running / waiting counts for metrics."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the loop thread."""
