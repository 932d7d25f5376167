"""What the HTTP app asks of a backend, and the typed replies it gets back.

Two backends implement `Backend`: OpenAIServing (flask_backend/serving.py) over an in-process engine (PyTorch
or ONNX Runtime), and VLLMProxy (vllm/proxy.py) in front of a vLLM server. The app only routes,
authenticates and turns replies into HTTP responses; each backend records its own metrics.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Protocol, Union

from artifacts.finetune import adapter_of
from serve.engines.base import EngineStats
from serve.errors import APIError, bad_request

if TYPE_CHECKING:
    from serve.registry_sync import AdapterSync


@dataclass(frozen=True)
class JSONReply:
    """A complete answer: a JSON object, or JSON bytes relayed as they came (the vLLM proxy)."""

    body: dict[str, Any] | bytes
    status: int = 200
    mimetype: str = "application/json"


@dataclass(frozen=True)
class EventStream:
    """Server-sent events as JSON objects; the app frames each as a `data:` line and ends with [DONE].

    Closing `events` (the client went away) cancels the generation behind it."""

    events: Generator[dict[str, Any], None, None]


@dataclass(frozen=True)
class RelayedStream:
    """Server-sent events relayed byte for byte (already framed, [DONE] included): the vLLM proxy."""

    chunks: Generator[bytes, None, None]


Reply = Union[JSONReply, EventStream, RelayedStream]


class Backend(Protocol):
    """The API a backend serves: its models, its load, and the two generation endpoints (raw JSON in)."""

    @property
    def model_name(self) -> str: ...

    def is_served(self, model: object) -> bool: ...

    def models(self) -> JSONReply: ...

    def stats(self) -> EngineStats: ...

    def completions(self, raw_body: bytes) -> Reply: ...

    def chat_completions(self, raw_body: bytes) -> Reply: ...


@dataclass(frozen=True)
class ServedModels:
    """The names a backend answers to: its base model and the adapters AdapterSync holds loaded.

    The one answer to "is this name served", for routing (404) and for metric labels alike."""

    base: str
    sync: AdapterSync | None = None

    def canonical(self, model: object) -> object:
        """A fine-tuning job's model name, `ft:<base>:<suffix>:<id>`, is the registry adapter `ft-<id>`, and
        its checkpoints' `...:ckpt-step-<N>` the adapter `ft-<id>-step-<N>`."""
        if isinstance(model, str) and model.startswith("ft:"):
            return adapter_of(model, self.base) or model
        return model

    def is_served(self, model: object) -> bool:
        model = self.canonical(model)
        return isinstance(model, str) and (model == self.base or (self.sync is not None and self.sync.is_loaded(model)))

    def adapter(self, model: object) -> str | None:
        """The adapter a request for `model` runs on (None: the base); 404 for a name not served."""
        if not self.is_served(model):
            raise APIError(404, f"The model '{model}' does not exist", "model", "model_not_found")
        model = self.canonical(model)
        return None if model == self.base else str(model)

    def label(self, model: object) -> str:
        """`model` as a metric label: names not served become "_unknown" (clients must not grow the label set)."""
        return str(self.canonical(model)) if self.is_served(model) else "_unknown"

    def labels(self, model: object) -> tuple[str, str]:
        """(model, adapter) metric labels; the adapter label is empty for the base and for unknown names."""
        label = self.label(model)
        return label, "" if label in (self.base, "_unknown") else label


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a "\ud800"-style escape: maybe half a pair


def json_body(raw: bytes) -> Any:
    """The request body as JSON; 400 for bytes that are not, or that are not UTF-8 text.

    json.loads alone takes UTF-16/32 bodies and lets lone surrogates through (as encoded bytes with
    surrogatepass, or as "\ud800" escapes): such strings are not text, and tokenizers fail on them."""
    try:
        text = raw.decode("utf-8")  # strict: RFC 8259 JSON between systems is UTF-8
        obj = json.loads(text)
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(obj, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
        return obj
    except (json.JSONDecodeError, UnicodeError) as e:
        raise bad_request(f"invalid JSON body: {e}") from None

