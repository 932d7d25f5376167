"""What an engine offers the HTTP layer: submit a request, receive its tokens on a queue."""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


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


@dataclass
class GenRequest:
    """One sequence to generate. The engine puts events on `events`, tagged with `index` (the choice):
    (index, "text", delta), then (index, "done", finish_reason, completion_tokens) or (index, "error", message)."""

    prompt_ids: list[int]
    adapter: str | None  # None = base model
    params: SamplingParams
    events: queue.Queue = field(default_factory=queue.Queue)  # shared by the n choices of one API request
    index: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


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
    def stats(self) -> dict[str, int]:
        """running / waiting counts for metrics."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the loop thread."""
