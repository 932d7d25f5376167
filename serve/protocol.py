"""Request schemas of the OpenAI API subset we serve, validated into typed objects.

Named as in the OpenAI API (CompletionRequest, ChatCompletionRequest). Unknown fields are ignored,
as OpenAI clients send extras; wrong types and out-of-range values are 400s naming the param.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serve.engines.base import SamplingParams
from serve.errors import bad_request

MAX_N = 8  # choices per request; each is a row in the batch
MAX_STOP = 4  # as OpenAI


def _num(body: dict, key: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise bad_request(f"'{key}' must be {'an integer' if integer else 'a number'}", key)
    if not lo <= v <= hi:
        raise bad_request(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return v


@dataclass
class _Common:
    model: str
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    max_tokens_given: bool = False


def _common(body: Any, default_max_tokens: int) -> _Common:
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", "model")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _num(body, max_key, default_max_tokens, 1, 1 << 20, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > MAX_STOP:
        raise bad_request(f"'stop' must be a string or a list of up to {MAX_STOP} strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request("'seed' must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    include_usage = bool((so or {}).get("include_usage", False))
    ignore_eos = body.get("ignore_eos", False)  # vLLM extension, not in the OpenAI spec
    if not isinstance(ignore_eos, bool):
        raise bad_request("'ignore_eos' must be a boolean", "ignore_eos")
    params = SamplingParams(max_tokens=max_tokens, temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_num(body, "top_p", 1.0, 0.0, 1.0), stop=[s for s in stop if s], seed=seed,
                            ignore_eos=ignore_eos)
    if params.top_p == 0.0:
        params.top_p = 1e-9  # "only the most likely token"
    return _Common(model, params, _num(body, "n", 1, 1, MAX_N, integer=True), stream, include_usage,
                   body.get(max_key) is not None)


@dataclass
class CompletionRequest(_Common):
    prompt: str = ""

    @classmethod
    def parse(cls, body: Any) -> "CompletionRequest":
        c = _common(body, default_max_tokens=16)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad_request("'prompt' must be a string (or a list of one string)", "prompt")
        return cls(**c.__dict__, prompt=prompt)


@dataclass
class ChatCompletionRequest(_Common):
    messages: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, body: Any) -> "ChatCompletionRequest":
        c = _common(body, default_max_tokens=512)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad_request("'messages' must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
                raise bad_request(f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise bad_request(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise bad_request(f"messages[{i}].content must be a string", f"messages[{i}].content")
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        return cls(**c.__dict__, messages=out)
