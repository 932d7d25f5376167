"""The OpenAPI description of the served API (/openapi.json), for clients and fuzzers."""

from __future__ import annotations

_ERR = {"description": "OpenAI-style error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_ERRORS = {str(c): _ERR for c in (400, 401, 404, 413, 503)}
_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": 8},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
    "seed": {"type": "integer"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}


def _post(summary: str, schema: str) -> dict:
    return {"post": {"summary": summary, "security": [{"bearer": []}],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
                     "responses": {"200": {"description": "completion (JSON) or SSE stream ending in data: [DONE]"}, **_ERRORS}}}


def openapi_spec() -> dict:
    return {
        "openapi": "3.0.3",
        "info": {"title": "tunestack OpenAI-compatible API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                     "param": {"type": "string", "nullable": True},
                                                     "code": {"type": "string", "nullable": True}}}}},
                "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": {
                    **_SAMPLING, "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 1}]}}},
                "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": {
                    **_SAMPLING, "messages": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["role", "content"],
                        "properties": {"role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                                       "content": {"type": "string"}}}}}},
            },
        },
        "paths": {
            "/v1/models": {"get": {"summary": "base model and adapters (adapters carry `parent`)", "security": [{"bearer": []}],
                                   "responses": {"200": {"description": "model list"}, "401": _ERR}}},
            "/v1/completions": _post("text completion", "CompletionRequest"),
            "/v1/chat/completions": _post("chat completion", "ChatCompletionRequest"),
            "/health": {"get": {"summary": "liveness", "responses": {"200": {"description": "alive"}}}},
            "/ready": {"get": {"summary": "readiness: model loaded", "responses": {"200": {"description": "ready"}, "503": {"description": "loading"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format"}}}},
        },
    }
