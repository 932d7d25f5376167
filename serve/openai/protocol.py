"""Request and response bodies of the OpenAI API subset we serve, as pydantic models.

Named as in the OpenAI API (and vLLM's entrypoints/openai/protocol.py). /openapi.json is generated from
these models (serve/http/openapi.py), so the spec is exactly what parse() accepts: unknown fields are ignored, as
OpenAI clients send extras; wrong types and out-of-range values are 400s naming the param.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError
from typing_extensions import Self, TypedDict

from serve.engines.base import SamplingParams
from serve.errors import APIError, bad_request
from serve.schema import bounded_int

MAX_N = 8  # choices per request; each is a row in the batch
MAX_STOP = 4  # as OpenAI
MAX_TOKENS = 1 << 20
INT64 = (-(1 << 63), (1 << 63) - 1)  # torch generators take 64-bit seeds (serving adds at most MAX_N - 1)

# strict: no bools as numbers, no "1" as 1; allow_inf_nan off: json.loads lets NaN through, no sampler wants it.
_CONFIG = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

# What each param must be: the spec's description and the 400's message, from one place.
RULES = {
    "model": "a non-empty string: the base model or an adapter, as listed by /v1/models",
    "prompt": "a non-empty string, or a list of exactly one non-empty string",
    "messages": "a non-empty list of messages",
    "role": "one of system, developer, user, assistant (developer is treated as system)",
    "content": "a string, or a list of text parts {\"type\": \"text\", \"text\": string}",
    "max_tokens": f"an integer from 1 to {MAX_TOKENS}, or null",
    "max_completion_tokens": f"an integer from 1 to {MAX_TOKENS}, or null (takes precedence over max_tokens)",
    "temperature": "a number from 0 to 2, or null (0 is greedy)",
    "top_p": "a number from 0 to 1, or null (0 keeps only the most likely token)",
    "n": f"an integer from 1 to {MAX_N}, or null",
    "stop": f"a string, a list of up to {MAX_STOP} strings, or null",
    "seed": f"an integer from {INT64[0]} to {INT64[1]}, or null",
    "stream": "a boolean, or null",
    "stream_options": "an object {\"include_usage\": boolean}, or null",
    "include_usage": "a boolean, or null",
    "ignore_eos": "a boolean, or null (vLLM extension: generate exactly max_tokens)",
}


def _rule(name: str, default: Any = None) -> Any:
    """A field whose description is its rule."""
    return Field(default, description=RULES[name])


TokenCount = bounded_int(1, MAX_TOKENS)
ChoiceCount = bounded_int(1, MAX_N)
Seed = bounded_int(*INT64)
Temperature = Annotated[float, Field(ge=0, le=2)]  # strict floats take ints, not bools
TopP = Annotated[float, Field(ge=0, le=1)]
StopList = Annotated[list[str], Field(max_length=MAX_STOP)]
Text = Annotated[str, Field(min_length=1)]  # an empty prompt has no token to condition on
OneString = Annotated[list[Text], Field(min_length=1, max_length=1)]
Role = Literal["system", "developer", "user", "assistant"]


# -- requests -------------------------------------------------------------------------------------------

class TextContentPart(BaseModel):
    """A text part of a message's content."""

    model_config = _CONFIG
    type: Literal["text"]
    text: str


def _system(role: str) -> str:
    """OpenAI's newer name for the system role; chat templates know only "system"."""
    return "system" if role == "developer" else role


def _join(content: str | list[TextContentPart]) -> str:
    """A message's text: the string, or its text parts joined."""
    return content if isinstance(content, str) else "".join(p.text for p in content)


class ChatMessage(TypedDict):
    """A chat message."""

    # A TypedDict, not a model: it validates into the plain {"role", "content": str} dict chat templates take.
    __pydantic_config__ = _CONFIG  # type: ignore[misc]
    role: Annotated[Role, AfterValidator(_system), Field(description=RULES["role"])]
    content: Annotated[str | list[TextContentPart], AfterValidator(_join), Field(description=RULES["content"])]


class StreamOptions(BaseModel):
    """Options of a streamed response."""

    model_config = _CONFIG
    include_usage: Optional[bool] = _rule("include_usage", False)


class _SamplingRequest(BaseModel):
    """Fields shared by both endpoints; `null` means the default. parse() is the way in."""

    model_config = _CONFIG
    default_max_tokens: ClassVar[int]
    model: str = Field(min_length=1, description=RULES["model"])
    max_tokens: Optional[TokenCount] = _rule("max_tokens")
    max_completion_tokens: Optional[TokenCount] = _rule("max_completion_tokens")
    temperature: Optional[Temperature] = _rule("temperature", 1.0)
    top_p: Optional[TopP] = _rule("top_p", 1.0)
    n: Optional[ChoiceCount] = _rule("n", 1)
    stop: str | StopList | None = _rule("stop")
    seed: Optional[Seed] = _rule("seed")
    stream: Optional[bool] = _rule("stream", False)
    stream_options: Optional[StreamOptions] = _rule("stream_options")
    ignore_eos: Optional[bool] = _rule("ignore_eos", False)
    _params: SamplingParams = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        """Resolve nulls to defaults and build the engine's SamplingParams once (serving may lower max_tokens)."""
        for name in ("n", "stream", "ignore_eos"):  # serving reads these directly
            if getattr(self, name) is None:
                setattr(self, name, type(self).model_fields[name].default)
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        top_p = 1.0 if self.top_p is None else self.top_p
        self._params = SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or self.default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=top_p or 1e-9,  # 0: "only the most likely token"
            stop=[s for s in stop if s], seed=self.seed, ignore_eos=self.ignore_eos)

    @property
    def params(self) -> SamplingParams:
        """The sampling parameters handed to the engine."""
        return self._params

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def max_tokens_given(self) -> bool:
        """Whether the client chose the completion length (else chat fills the context)."""
        return self.max_completion_tokens is not None or self.max_tokens is not None

    @classmethod
    def parse(cls, body: Any) -> Self:
        """Validate a decoded JSON body; raises a 400 APIError naming the first bad param."""
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        try:
            return cls.model_validate(body)
        except ValidationError as e:
            raise _to_api_error(e) from None


def _only(prompt: str | list[str]) -> str:
    """The prompt text: batched prompts are not supported, so a list holds exactly one."""
    return prompt if isinstance(prompt, str) else prompt[0]


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    default_max_tokens: ClassVar[int] = 16  # OpenAI's completions default
    prompt: Annotated[Text | OneString, AfterValidator(_only)] = Field(description=RULES["prompt"])


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    default_max_tokens: ClassVar[int] = 512  # serving lowers it to what fits the context
    messages: list[ChatMessage] = Field(min_length=1, description=RULES["messages"])


def _param(loc: tuple[int | str, ...]) -> str:
    """The API param an error location names (union branch tags like 'list[str]' are dropped)."""
    head = str(loc[0]) if loc else ""
    if head == "messages" and len(loc) > 1:
        # a message that is not an object has no role to read: name the role, as before
        leaf = loc[2] if len(loc) > 2 and loc[2] in ("role", "content") else "role"
        return f"messages[{loc[1]}].{leaf}"
    if head == "stream_options" and len(loc) > 1 and loc[1] == "include_usage":
        return "stream_options.include_usage"
    return head


def _to_api_error(e: ValidationError) -> APIError:
    """A one-line 400 from pydantic's first error, in the param's own terms."""
    err = e.errors(include_url=False)[0]
    param = _param(err["loc"])
    rule = RULES.get(param.rsplit(".", 1)[-1], "valid")
    if err["type"] == "missing":
        return bad_request(f"'{param}' is required; it must be {rule}", param)
    if err["type"] == "string_too_short":  # the engine's own words for an empty prompt, so both read alike
        return bad_request(f"{param} must not be empty", param)
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return bad_request(f"'{param}' must be {rule}; got {got}", param)


# -- responses: every field the server always sends has no default, so the spec marks it required ---------

FinishReason = Literal["stop", "length"]


class UsageInfo(BaseModel):
    """Token counts of a request (all choices)."""
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Body(BaseModel):
    """Fields of every completion body and chunk."""
    id: str
    created: int
    model: str


class _Choice(BaseModel):
    """Fields of every choice."""
    index: int
    logprobs: None


class CompletionResponseChoice(_Choice):
    """One choice of a text completion."""
    text: str
    finish_reason: FinishReason


class CompletionResponse(_Body):
    """The body of a non-streamed /v1/completions response."""
    object: Literal["text_completion"]
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionChunkChoice(_Choice):
    """Text of one choice in a stream; finish_reason is set on its last chunk."""
    text: str
    finish_reason: Optional[FinishReason]


class CompletionChunk(_Body):
    """One SSE event of a streamed /v1/completions response; the usage-only last one has no choices."""
    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]
    usage: Optional[UsageInfo] = Field(None, description="sent with stream_options.include_usage")


class ChatCompletionMessage(BaseModel):
    """The assistant's reply."""
    role: Literal["assistant"]
    content: str


class ChatCompletionResponseChoice(_Choice):
    """One choice of a chat completion."""
    message: ChatCompletionMessage
    finish_reason: FinishReason


class ChatCompletionResponse(_Body):
    """The body of a non-streamed /v1/chat/completions response."""
    object: Literal["chat.completion"]
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """What a chat chunk adds to a choice: the role first, then content; {} on the last."""
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatCompletionChunkChoice(_Choice):
    """One choice's delta in a stream; finish_reason is set on its last chunk."""
    delta: DeltaMessage
    finish_reason: Optional[FinishReason]


class ChatCompletionChunk(_Body):
    """One SSE event of a streamed /v1/chat/completions response; the usage-only last one has no choices."""
    object: Literal["chat.completion.chunk"]
    choices: list[ChatCompletionChunkChoice]
    usage: Optional[UsageInfo] = Field(None, description="sent with stream_options.include_usage")


class ModelCard(BaseModel):
    """A served model: the base model, or an adapter whose `parent` is the base model."""
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: Optional[str]
    parent: Optional[str]
    # tunestack extras (the OpenAI SDK ignores them): the adapter's registry version and its evidence
    version: Optional[str] = None
    task_metric: Optional[str] = None
    task_gain: Optional[float] = None
    retention: Optional[dict[str, Optional[float]]] = None
    gate: Optional[dict[str, Any]] = None


class ModelList(BaseModel):
    """The body of GET /v1/models."""
    object: Literal["list"]
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """What went wrong; `param` names the offending request field."""
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    """An OpenAI-style error body."""
    error: ErrorInfo


# -- probes and the admin API (tunestack's own, not OpenAI's) ----------------------------------------------

class Health(BaseModel):
    """The body of GET /health: the process answers."""
    status: Literal["ok"]


class Readiness(BaseModel):
    """The body of GET /ready: "ready" with the loaded adapters (200), or "loading" (503)."""
    status: Literal["ready", "loading"]
    adapters: list[str] = Field([], description="loaded adapters; sent when ready")


AdapterStateName = Literal["loaded", "refused", "failed", "disabled"]


class AdapterStatus(BaseModel):
    """An adapter's state in this server (serve/registry_sync.py AdapterState.public(): unset fields are left out)."""
    state: AdapterStateName
    reason: Optional[str] = Field(None, description="why it is refused, failed or disabled")
    version: Optional[str] = Field(None, description="manifest created_at + weights sha: a re-publish reloads")
    method: Optional[str] = None
    rank: Optional[int] = None
    load_seconds: Optional[float] = None
    updated_at: Optional[float] = None
    evidence: Optional[dict[str, Any]] = None


class AdapterList(BaseModel):
    """The body of GET /admin/adapters: every adapter the registry names, by name."""
    adapters: dict[str, AdapterStatus]


class AdapterAction(AdapterStatus):
    """The body of POST /admin/adapters/{name}/load (200 loaded, 422 refused or failed) and .../unload."""
    name: str
