"""serve/openapi.py: the spec is generated from serve/protocol.py's models (a field added there shows here),
and what the server sends matches the response schemas (Schemathesis checks both against a live server)."""

from __future__ import annotations

import json
import re
from typing import Optional

import pytest

from serve import protocol
from serve.app import build_app
from serve.engines.base import Engine, EngineStats, Finished, GenRequest, TextDelta
from serve.metrics import Metrics
from serve.openapi import openapi_spec
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.serving import OpenAIServing
from serve.settings import Settings
from tests.serve.test_protocol import SPEC, M, U, c, chat, validator


def props(name: str) -> dict:
    """The properties of a component schema, each nullable one as its non-null branch."""
    out = {}
    for key, schema in SPEC["components"]["schemas"][name]["properties"].items():
        branches = [b for b in schema.get("anyOf", [schema]) if b.get("type") != "null"]
        out[key] = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return out


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest, protocol.ModelCard, protocol.ErrorInfo])
def test_schema_properties_are_the_model_fields(model):
    assert set(SPEC["components"]["schemas"][model.__name__]["properties"]) == set(model.model_fields)


def test_request_schemas_carry_the_rules():
    comp = props("CompletionRequest")
    assert comp["max_tokens"] == {"type": "integer", "minimum": 1, "maximum": 1 << 20}
    assert comp["max_completion_tokens"] == comp["max_tokens"]
    assert comp["n"] == {"type": "integer", "minimum": 1, "maximum": 8}
    assert comp["temperature"] == {"type": "number", "minimum": 0, "maximum": 2}
    assert comp["top_p"] == {"type": "number", "minimum": 0, "maximum": 1}
    strings = {"type": "array", "items": {"type": "string"}}
    assert comp["stop"] == {"anyOf": [{"type": "string"}, {**strings, "maxItems": 4}]}
    assert comp["prompt"]["anyOf"] == [{"type": "string"}, {**strings, "minItems": 1, "maxItems": 1}]
    assert comp["stream"]["type"] == comp["ignore_eos"]["type"] == "boolean"
    assert props("ChatCompletionRequest")["messages"]["minItems"] == 1
    assert SPEC["components"]["schemas"]["ChatCompletionRequest"]["required"] == ["model", "messages"]
    msg = SPEC["components"]["schemas"]["ChatMessage"]
    assert msg["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant"]
    assert set(msg["required"]) == {"role", "content"}
    for name in ("CompletionRequest", "ChatCompletionRequest", "ChatMessage", "TextContentPart", "StreamOptions"):
        assert SPEC["components"]["schemas"][name].get("additionalProperties", True) is not False  # extras ignored


def test_a_field_added_to_a_model_appears_in_the_spec(monkeypatch):
    class CompletionRequest(protocol.CompletionRequest):
        best_of: Optional[protocol.ChoiceCount] = None

    monkeypatch.setattr(protocol, "CompletionRequest", CompletionRequest)
    best_of = openapi_spec()["components"]["schemas"]["CompletionRequest"]["properties"]["best_of"]
    assert best_of["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 8}


def test_paths_and_operations():
    assert SPEC["openapi"].startswith("3.1") and SPEC["info"]["title"]
    assert SPEC["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert set(SPEC["paths"]) == {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/ready",
                                  "/metrics"}
    for path, req, res in (("/v1/completions", "CompletionRequest", "CompletionResponse"),
                           ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletionResponse")):
        op = SPEC["paths"][path]["post"]
        assert op["security"] == [{"bearer": []}]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{req}"}
        ok = op["responses"]["200"]["content"]
        assert ok["application/json"]["schema"] == {"$ref": f"#/components/schemas/{res}"} and "text/event-stream" in ok
        for code in ("400", "401", "404", "413", "503"):
            err = op["responses"][code]["content"]["application/json"]["schema"]
            assert err == {"$ref": "#/components/schemas/ErrorResponse"}
    assert SPEC["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
    models = SPEC["paths"]["/v1/models"]["get"]["responses"]
    assert models["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ModelList"}


def test_every_ref_resolves():
    names = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(SPEC)))
    assert names and names <= set(SPEC["components"]["schemas"]) and "$defs" not in json.dumps(SPEC)


# -- responses: what the server sends is what the spec says --------------------------------------------------

class FakeEngine(Engine):
    """Answers every sequence at once: "hi", then a length stop."""

    model_name, max_model_len = M, 64

    def submit(self, req: GenRequest) -> None:
        req.ended = True
        req.events.put(TextDelta(req.index, "hi"))
        req.events.put(Finished(req.index, "length", 1))

    def tokenize(self, text: str) -> list[int]:
        return [1, 2]

    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        return [1, 2]

    def stats(self) -> EngineStats:
        return EngineStats()

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def shutdown(self) -> None: ...


def conforms(ref: dict, body) -> None:
    """The body is valid against the referenced schema, with no field the schema does not name."""
    name = ref["$ref"].rsplit("/", 1)[-1]
    assert not list(validator(name).iter_errors(body)), (name, body)
    assert set(body) <= set(SPEC["components"]["schemas"][name]["properties"]), (name, body)


@pytest.mark.parametrize("path,body,chunk", [("/v1/completions", c(n=2), "CompletionChunk"),
                                             ("/v1/chat/completions", chat(U, n=2), "ChatCompletionChunk")])
def test_responses_match_the_spec(path, body, chunk):
    metrics = Metrics()
    client = build_app(Settings(), OpenAIServing(FakeEngine(), None, metrics), metrics).test_client()
    spec = SPEC["paths"][path]["post"]["responses"]
    r = client.post(path, json=body)
    assert r.status_code == 200
    conforms(spec["200"]["content"]["application/json"]["schema"], r.json)
    r = client.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = r.get_data(as_text=True).strip().split("\n\n")
    assert events[-1] == "data: [DONE]" and len(events) > 3
    for e in events[:-1]:
        conforms({"$ref": f"#/components/schemas/{chunk}"}, json.loads(e.removeprefix("data: ")))
    for bad, code in ((dict(body, n=0), 400), (dict(body, model="nope"), 404)):
        r = client.post(path, json=bad)
        assert r.status_code == code
        conforms(spec[str(code)]["content"]["application/json"]["schema"], r.json)
    models = SPEC["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    conforms(models, client.get("/v1/models").json)
