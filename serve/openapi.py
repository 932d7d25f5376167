"""The OpenAPI description of the served API (/openapi.json), generated from serve/protocol.py's models.

Clients and fuzzers (Schemathesis) trust it, so every body schema comes from the pydantic model that
parses or builds that body: the spec cannot say something the server does not do.
"""

from __future__ import annotations

from pydantic import BaseModel

from serve import protocol as p

REF = "#/components/schemas/{model}"
ERRORS = {400: "Invalid request: error.param names the offending field.", 401: "Missing or wrong API key.",
          404: "Unknown model.", 413: "Request body too large.", 503: "Model still loading, or an engine failure."}
SSE = ("Server-sent events when the request sets `stream`: one `data: <{chunk} JSON>` event per chunk, a last "
       "usage-only chunk with `stream_options.include_usage`, then `data: [DONE]`. An engine failure mid-stream "
       "is sent as a `data: <ErrorResponse JSON>` event.")


def _ref(model: type[BaseModel]) -> dict:
    """A reference to a model's schema in components."""
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict:
    """A JSON content map whose schema is the model's."""
    return {"application/json": {"schema": _ref(model)}}


def _components(models: list[type[BaseModel]]) -> dict[str, dict]:
    """Each model's JSON schema, with the models it nests ($defs) hoisted beside it."""
    out: dict[str, dict] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF)
        for name, sub in [*schema.pop("$defs", {}).items(), (model.__name__, schema)]:
            if out.setdefault(name, sub) != sub:  # two different schemas under one name would lie to clients
                raise ValueError(f"two different schemas are named {name}")
    return out


def _errors(*codes: int) -> dict:
    """The error responses of an operation, each an ErrorResponse."""
    return {str(c): {"description": ERRORS[c], "content": _json(p.ErrorResponse)} for c in codes}


def _generate(summary: str, request: type[BaseModel], response: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """A POST endpoint answering JSON, or an SSE stream of chunks."""
    stream = {"schema": {"type": "string", "description": SSE.format(chunk=chunk.__name__)}}
    return {"post": {
        "summary": summary, "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": _json(request)},
        "responses": {"200": {"description": f"A {response.__name__}, or a stream of {chunk.__name__}s.",
                              "content": {**_json(response), "text/event-stream": stream}},
                      **_errors(400, 401, 404, 413, 503)}}}


def _get(summary: str, responses: dict, secured: bool = False) -> dict:
    """A GET endpoint; a secured one needs the API key (when one is set)."""
    return {"get": {"summary": summary, **({"security": [{"bearer": []}]} if secured else {}), "responses": responses}}


def openapi_spec() -> dict:
    """The OpenAPI 3.1 document."""
    models = [p.CompletionRequest, p.ChatCompletionRequest, p.CompletionResponse, p.CompletionChunk,
              p.ChatCompletionResponse, p.ChatCompletionChunk, p.ModelList, p.ErrorResponse]
    models_op = _get("The base model and the loaded adapters (adapters carry `parent`).",
                     {"200": {"description": "Model list.", "content": _json(p.ModelList)}, **_errors(401, 503)}, True)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tunestack OpenAI-compatible API", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                       "schemas": _components(models)},
        "paths": {
            "/v1/models": models_op,
            "/v1/completions": _generate("Text completion.", p.CompletionRequest, p.CompletionResponse,
                                         p.CompletionChunk),
            "/v1/chat/completions": _generate("Chat completion.", p.ChatCompletionRequest, p.ChatCompletionResponse,
                                              p.ChatCompletionChunk),
            "/health": _get("Liveness.", {"200": {"description": "Alive."}}),
            "/ready": _get("Readiness: the model is loaded.", {"200": {"description": "Ready."},
                                                               "503": {"description": "Loading."}}),
            "/metrics": _get("Prometheus metrics.", {"200": {
                "description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}}),
        },
    }
