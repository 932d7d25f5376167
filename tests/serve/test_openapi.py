"""serve/http/openapi.py: the spec is generated from serve/openai/protocol.py's models (a field added there shows here),
and what the server sends matches the response schemas (Schemathesis checks both against a live server)."""

from __future__ import annotations

import json
import re
from typing import Optional

import pytest
from jsonschema import Draft202012Validator

from serve.openai import protocol
from serve.http.app import build_app
from serve.engines.base import Engine, EngineStats, Finished, GenRequest, TextDelta
from serve.metrics import Metrics
from serve.http.openapi import ADAPTER_NAME, Served, openapi_spec
from serve.openai.protocol import ChatCompletionRequest, CompletionRequest
from serve.flask_backend.serving import OpenAIServing
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
    text = {"type": "string", "minLength": 1}  # an empty prompt is refused (it has no token to start from)
    assert comp["prompt"]["anyOf"] == [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}]
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
    schemes = SPEC["components"]["securitySchemes"]
    assert {k: (v["type"], v["scheme"]) for k, v in schemes.items()} == {"bearer": ("http", "bearer"),
                                                                          "admin": ("http", "bearer")}
    assert set(SPEC["paths"]) >= {"/v1/me", "/v1/registry/models", "/v1/registry/models/{name}",
                                  "/v1/registry/models/{name}/rollback", "/v1/fine_tuning/methods",
                                  "/v1/registry/models/{name}/versions/{version}/metrics", "/v1/files/{fid}/preview",
                                  "/v1/fine_tuning/jobs/{jid}/metrics", "/v1/fine_tuning/jobs/{jid}/evaluation",
                                  "/v1/fine_tuning/jobs/{jid}/publish",  # the console's API (docs/serve.md)
                                  "/v1/models", "/v1/completions", "/v1/chat/completions", "/admin/adapters",
                                  "/admin/adapters/{name}/load", "/admin/adapters/{name}/unload", "/health",
                                  "/ready", "/metrics", "/openapi.json", "/", "/v1/files", "/v1/files/{fid}",
                                  "/v1/files/{fid}/content", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{jid}",
                                  "/v1/fine_tuning/jobs/{jid}/cancel", "/v1/fine_tuning/jobs/{jid}/events",
                                  "/v1/fine_tuning/jobs/{jid}/checkpoints"}
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


# -- every route, and the key each one needs -----------------------------------------------------------------

KEYS = Settings(api_key="fuzz-api-key-123", admin_key="fuzz-admin-key-456")


def served_app(settings: Settings = Settings()):
    metrics = Metrics()
    return build_app(settings, OpenAIServing(FakeEngine(), None, metrics), metrics)


def routes(app) -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every route the Flask app serves; HEAD and OPTIONS come with GET."""
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        out |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return out


def test_every_route_the_app_serves_is_described():
    """A route added to serve/http/routes.py without a spec entry fails here (the fuzzer would never reach it)."""
    described = {(path, method) for path, ops in SPEC["paths"].items() for method in ops}
    assert routes(served_app(KEYS)) == described


@pytest.mark.parametrize("path,method", sorted(routes(served_app(KEYS))))
def test_security_says_which_key_a_route_needs(path, method):
    """A route the spec marks secured answers 401 without its key and not with it; an open one never 401s."""
    client = served_app(KEYS).test_client()
    url = path.replace("{name}", "chef-a")
    body = {"model": M, "prompt": "x", "max_tokens": 1} if method == "post" else None
    security = SPEC["paths"][path][method].get("security", [])
    key = {"bearer": KEYS.api_key, "admin": KEYS.admin_key}[next(iter(security[0]))] if security else None
    bare = client.open(url, method=method.upper(), json=body)
    if key is None:
        assert bare.status_code != 401
        return
    assert bare.status_code == 401
    conforms(SPEC["paths"][path][method]["responses"]["401"]["content"]["application/json"]["schema"], bare.json)
    assert client.open(url, method=method.upper(), json=body, headers={"Authorization": "Bearer not-a-key-123"}
                       ).status_code == 401
    if next(iter(security[0])) == "admin":  # a key without the admin scope: 403 (tests/serve/test_console_auth.py)
        assert client.open(url, method=method.upper(), json=body, headers={"Authorization": f"Bearer {KEYS.api_key}"}
                           ).status_code == 403
    ok = client.open(url, method=method.upper(), json=body, headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code != 401 and str(ok.status_code) in SPEC["paths"][path][method]["responses"]


def test_open_routes_answer_what_the_spec_says():
    client = served_app().test_client()
    for path, model in (("/health", protocol.Health), ("/ready", protocol.Readiness)):
        r = client.get(path)
        assert r.status_code == 200
        conforms(SPEC["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"], r.json)
    assert client.get("/openapi.json").json == SPEC
    assert client.get("/").mimetype == "text/html" and client.get("/metrics").mimetype == "text/plain"
    loading = build_app(Settings(), None, Metrics()).test_client().get("/ready")
    assert loading.status_code == 503
    conforms(SPEC["paths"]["/ready"]["get"]["responses"]["503"]["content"]["application/json"]["schema"], loading.json)


def test_admin_schemas_match_adapter_states():
    """AdapterState.public() drops unset fields: each shape the admin API sends conforms."""
    from serve.registry_sync import AdapterState

    loaded = AdapterState("loaded", version="v", method="lora", rank=4, load_seconds=0.1, evidence={"version": "v1"})
    conforms({"$ref": "#/components/schemas/AdapterList"}, {"adapters": {"a": loaded.public(),
                                                                         "b": AdapterState("refused", "rank").public()}})
    conforms({"$ref": "#/components/schemas/AdapterAction"}, {"name": "a", **loaded.public()})
    conforms({"$ref": "#/components/schemas/AdapterAction"}, {"name": "a", "state": "disabled"})
    assert not validator("AdapterAction").is_valid({"name": "a", "state": "gone"})


@pytest.mark.parametrize("name,ok", [("chef-a", True), ("chef-a@v12", True), ("a.b_c-1", True), ("../etc", False),
                                     ("a..b", False), ("-a", False), ("a/b", False), ("a@v0", False), ("", False),
                                     ("a" * 65, False)])
def test_adapter_name_pattern_is_the_registry_rule(name, ok):
    from artifacts import RegistryError, split_ref

    try:
        split_ref(name)
        valid = True
    except RegistryError:
        valid = False
    assert valid == ok == bool(re.match(ADAPTER_NAME, name))


# -- streams: each event as Schemathesis reads it ----------------------------------------------------------

def event_validator(path: str) -> Draft202012Validator:
    schema = SPEC["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    return Draft202012Validator({**schema, "components": SPEC["components"]})


@pytest.mark.parametrize("path,body", [("/v1/completions", c()), ("/v1/chat/completions", chat(U))])
def test_event_stream_schema_describes_each_event(path, body):
    """Found by Schemathesis (ST108): the stream was described as one string, so every event failed its check.
    Each event is now {data}: a chunk or an ErrorResponse as JSON, or the closing [DONE]."""
    r = served_app().test_client().post(path, json={**body, "stream": True})
    events = [{"event": "message", "data": e.removeprefix("data: ")}
              for e in r.get_data(as_text=True).strip().split("\n\n")]
    check = event_validator(path)
    content = check.schema["properties"]["data"]["else"]["contentSchema"]
    chunks = Draft202012Validator({**content, "components": SPEC["components"]})
    for e in events:
        assert check.is_valid(e)
        if e["data"] != "[DONE]":
            assert chunks.is_valid(json.loads(e["data"])), e
    assert not chunks.is_valid({"id": "x"}) and not check.is_valid({"event": "message"})


# -- a spec narrowed to what one server serves ---------------------------------------------------------------

def test_narrowed_spec_names_the_served_models_and_the_context():
    spec = openapi_spec(Served(("tiny", "chef-a"), 64, ("chef-a", "big-rank")))
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = spec["components"]["schemas"][name]["properties"]
        assert props["model"]["enum"] == ["tiny", "chef-a"]
        assert props["max_tokens"]["anyOf"][0]["maximum"] == props["max_completion_tokens"]["anyOf"][0]["maximum"] == 63
    name = spec["paths"]["/admin/adapters/{name}/load"]["post"]["parameters"][0]["schema"]
    assert name["enum"] == ["chef-a", "big-rank"] and all(re.match(name["pattern"], n) for n in name["enum"])
    assert openapi_spec() == SPEC  # the served description is untouched


def test_undeclared_method_gets_405_with_allow_and_an_error_body():
    """Found by Schemathesis (ST204, unsupported_method): TRACE /health answered 405 without the Allow header
    RFC 9110 requires, because app.py's HTTPException handler rebuilds the response and drops e.get_headers()."""
    r = served_app().test_client().open("/health", method="TRACE")
    assert r.status_code == 405
    assert set(r.headers.get("Allow", "").replace(" ", "").split(",")) >= {"GET", "HEAD"}
