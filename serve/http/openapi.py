"""The OpenAPI description of the served API (/openapi.json), generated from serve/openai/protocol.py's models.

Clients and fuzzers (Schemathesis) trust it, so every body schema comes from the pydantic model that
parses or builds that body: the spec cannot say something the server does not do. It names every route
the app serves (tests/serve/test_openapi.py enumerates the app's url_map), each with the key it needs.
Given what a server serves (`Served`), it also names the models and the context limit, so that a body
the spec allows can succeed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from pydantic import BaseModel

from serve.finetune import protocol as ft
from serve.http import console_protocol as cp
from serve.openai import protocol as p

REF = "#/components/schemas/{model}"
ERRORS = {400: "Invalid request: error.param names the offending field.", 401: "Missing or wrong key.",
          403: "The key lacks the operation's scope (code insufficient_scope).",
          404: "Unknown model, adapter, file or job.", 413: "Request body too large.",
          503: "Model still loading, or an engine failure."}
SSE = ("Server-sent events when the request sets `stream`: one `data: <{chunk} JSON>` event per chunk, a last "
       "usage-only chunk with `stream_options.include_usage`, then `data: [DONE]`. An engine failure mid-stream "
       "is sent as a `data: <ErrorResponse JSON>` event.")
API_KEY = [{"bearer": []}]
ADMIN_KEY = [{"admin": []}]
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "A key with the operation's scope (x-scope: inference or finetune): SERVE_API_KEY has "
                              "both, SERVE_ADMIN_KEY every scope, SERVE_KEYS_FILE names each key's. Without "
                              "SERVE_API_KEY and a keys file, /v1/* is open (local use only)."},
    "admin": {"type": "http", "scheme": "bearer",
              "description": "A key with the admin scope (SERVE_ADMIN_KEY, or one in SERVE_KEYS_FILE): publish, "
                             "rollback, /admin/*; without such a key the admin API is off (404)."}}
# artifacts/registry.py's names: `name` or `name@vN` (split_ref), never a path; ".." is refused there too
ADAPTER_NAME = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@v[1-9][0-9]{0,5})?$"
REGISTRY_NAME = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # a name, never name@vN: versions are listed inside
REQUESTS = ("CompletionRequest", "ChatCompletionRequest")


@dataclass(frozen=True)
class Served:
    """What one server serves now. Both change only with the registry, so a fetched spec stays true."""

    models: tuple[str, ...]  # the base model and the loaded adapters: any other `model` is a 404
    max_model_len: int  # prompt tokens + max_tokens; more is a 400 context_length_exceeded
    adapters: tuple[str, ...] = ()  # the registry's adapter names: the admin API 404s any other


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
    stream = {"schema": _event(chunk)}
    return {"post": {
        "summary": summary, "security": API_KEY,
        "requestBody": {"required": True, "content": _json(request)},
        "responses": {"200": {"description": f"A {response.__name__}, or a stream of {chunk.__name__}s.",
                              "content": {**_json(response), "text/event-stream": stream}},
                      **_errors(400, 401, 404, 413, 503)}}}


def _event(chunk: type[BaseModel]) -> dict:
    """One server-sent event of a stream (OpenAPI 3.1: an event-stream schema describes each event)."""
    json_data = {"contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [_ref(chunk), _ref(p.ErrorResponse)]}}
    data = {"type": "string", "if": {"const": "[DONE]"}, "else": json_data}  # [DONE] is not JSON: never parsed
    return {"type": "object", "required": ["data"], "properties": {"data": data},
            "description": SSE.format(chunk=chunk.__name__)}


def _get(summary: str, responses: dict, security: list | None = None) -> dict:
    """A GET endpoint; one with `security` needs that key (when one is set)."""
    return {"get": {"summary": summary, **({"security": security} if security else {}), "responses": responses}}


def _text(description: str, media: str) -> dict:
    """A 200 whose body is text of this media type."""
    return {"200": {"description": description, "content": {media: {"schema": {"type": "string"}}}}}


def _admin_action(summary: str, refused: bool) -> dict:
    """POST /admin/adapters/{name}/load or /unload."""
    name = {"name": "name", "in": "path", "required": True, "description": "an adapter's registry name, or name@vN",
            "schema": {"type": "string", "pattern": ADAPTER_NAME}}
    responses = {"200": {"description": "The adapter's state after the action.", "content": _json(p.AdapterAction)},
                 **_errors(400, 401, 404, 503)}
    if refused:
        responses["422"] = {"description": "Refused or failed: `reason` says why.", "content": _json(p.AdapterAction)}
    return {"post": {"summary": summary, "security": ADMIN_KEY, "parameters": [name], "responses": responses}}


def _ok(model: type[BaseModel], description: str, *errors: int) -> dict:
    return {"200": {"description": description, "content": _json(model)}, **_errors(*errors)}


def _id(name: str, what: str) -> dict:
    return {"name": name, "in": "path", "required": True, "description": f"the {what}'s id", "schema": {"type": "string"}}


PAGING = [{"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
           "description": "the id of the last item of the previous page"},
          {"name": "limit", "in": "query", "required": False,
           "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}}]


def _op(op_id: str, summary: str, responses: dict, params: list | None = None, body: dict | None = None,
        scope: str = "finetune", links: dict | None = None) -> dict:
    """One operation needing a key with `scope` (admin: the admin scheme); `links` go on its 200."""
    if links:
        responses = {**responses, "200": {**responses["200"], "links": links}}
    return {"operationId": op_id, "summary": summary, "security": ADMIN_KEY if scope == "admin" else API_KEY,
            "x-scope": scope, **({"parameters": params} if params else {}),
            **({"requestBody": {"required": True, "content": body}} if body else {}), "responses": responses}


def _links(param: str, expr: str, *targets: str, body: dict[str, dict] | None = None) -> dict:
    """Links from a 200 to the operations using the id it returns (Schemathesis's stateful phase follows them)."""
    out = {t: {"operationId": t, "parameters": {f"path.{param}": expr}} for t in targets}
    for t, b in (body or {}).items():
        out[t] = {"operationId": t, "requestBody": b}
    return out


FILE_LINKS = _links("fid", "$response.body#/id", "getFile", "getFileContent", "previewFile", "deleteFile",
                    body={"createJob": {"training_file": "$response.body#/id",
                                         "validation_file": "$response.body#/id"}})
# not getJobEvaluation: a job just created has no evaluation yet (404 until its run evaluates), which a link
# would promise; the console asks for it once the job has succeeded or the gate refused it
JOB_LINKS = _links("jid", "$response.body#/id", "getJob", "cancelJob", "listJobEvents", "listJobCheckpoints",
                   "getJobMetrics", "publishJob")


def _finetune_paths() -> dict:
    """OpenAI's files and fine-tuning jobs (serve/finetune/api.py), with the console's additions."""
    fid, jid = _id("fid", "file"), _id("jid", "job")
    e = (400, 401, 403, 404)
    return {
        "/v1/files": {
            "get": _op("listFiles", "The uploaded files, newest first.", _ok(ft.FileList, "Files.", 401, 403),
                       [{"name": "purpose", "in": "query", "required": False, "schema": {"type": "string"}}]),
            "post": _op("uploadFile", "Upload training data; every row is validated with the trainer's readers: a "
                        "bad row is a 400 `FILE line N: field: reason` (code invalid_file_format) and nothing is "
                        "stored; a file over SERVE_MAX_UPLOAD_BYTES is a 413.",
                        _ok(ft.FileObject, "The stored file.", 400, 401, 403, 413),
                        body={"multipart/form-data": {"schema": ft.UPLOAD_SCHEMA, "encoding": ft.UPLOAD_ENCODING}},
                        links=FILE_LINKS)},
        "/v1/files/{fid}": {"get": _op("getFile", "A file.", _ok(ft.FileObject, "The file.", 401, 403, 404), [fid]),
                            "delete": _op("deleteFile", "Delete a file.", _ok(ft.FileDeleted, "Deleted.", 401, 403, 404),
                                          [fid])},
        "/v1/files/{fid}/content": {"get": _op("getFileContent", "A file's bytes, as uploaded.", {
            "200": {"description": "The file.", "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}, **_errors(401, 403, 404)}, [fid])},
        "/v1/files/{fid}/preview": {"get": _op(
            "previewFile", "The first rows as chat turns, cut into the spans the trainer encodes; `loss` marks the "
            "tokens that carry loss (the served base model's tokenizer).",
            _ok(cp.PreviewList, "Rows.", 400, 401, 403, 404, 503), [fid, PAGING[1]])},
        "/v1/fine_tuning/methods": {"get": _op(
            "listMethods", "Per method type, the hyperparameters a job accepts, with the trainer's default and reason.",
            _ok(cp.MethodList, "Methods.", 401, 403))},
        "/v1/fine_tuning/jobs": {
            "get": _op("listJobs", "Jobs, newest first.", _ok(ft.JobList, "Jobs.", 400, 401, 403), PAGING),
            "post": _op("createJob", "Queue a fine-tuning job; a worker trains it and publishes `fine_tuned_model`. "
                        "`training_file` and `validation_file` must be ids of the caller's uploads (404 otherwise).",
                        _ok(ft.FineTuningJob, "The queued job.", *e, 503), body=_json(ft.JobCreateRequest),
                        links=JOB_LINKS)},
        "/v1/fine_tuning/jobs/{jid}": {"get": _op("getJob", "A job.", _ok(ft.FineTuningJob, "The job.", 401, 403, 404),
                                                  [jid])},
        "/v1/fine_tuning/jobs/{jid}/cancel": {"post": _op("cancelJob", "Cancel a queued or running job; nothing is "
                                                          "published.", _ok(ft.FineTuningJob, "The job.", *e), [jid])},
        "/v1/fine_tuning/jobs/{jid}/events": {"get": _op("listJobEvents", "A job's events, newest first.",
                                                         _ok(ft.EventList, "Events.", *e), [jid, *PAGING])},
        "/v1/fine_tuning/jobs/{jid}/checkpoints": {"get": _op("listJobCheckpoints", "A job's checkpoints on disk, "
                                                              "newest first.", _ok(ft.CheckpointList, "Checkpoints.", *e),
                                                              [jid, *PAGING])},
        "/v1/fine_tuning/jobs/{jid}/metrics": {"get": _op(
            "getJobMetrics", "The run's loss series (train, validation, learning rate by step); it grows while the "
            "job runs, and is empty before it starts.", _ok(cp.MetricsList, "The series.", 401, 403, 404), [jid])},
        "/v1/fine_tuning/jobs/{jid}/evaluation": {"get": _op(
            "getJobEvaluation", "The run's evidence: task base vs tuned, retention by category with lost answers, "
            "KL, the gate's verdict. 404 (code not_evaluated) until the run has evaluated.",
            _ok(cp.Evidence, "The evidence.", 401, 403, 404), [jid])},
        "/v1/fine_tuning/jobs/{jid}/publish": {"post": _op(
            "publishJob", "Publish a finished run the gate refused: with `override_reason` it is published anyway "
            "and the reason recorded; 400 not_publishable for a job without such a run, gate_refused without a reason.",
            _ok(ft.FineTuningJob, "The job, now succeeded.", *e), [jid], _json(ft.PublishRequest), scope="admin")},
    }


def _registry_paths() -> dict:
    """The registry (serve/http/registry_api.py) and the caller's scopes."""
    name = {"name": "name", "in": "path", "required": True, "description": "a registry name",
            "schema": {"type": "string", "pattern": REGISTRY_NAME}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "pattern": cp.VERSION}}
    first = "$response.body#/data/0/name"
    return {
        "/v1/me": {"get": _op("getMe", "The caller's key and its scopes (the console hides what it may not do).",
                              _ok(cp.Me, "The key.", 401), scope="any")},
        "/v1/registry/models": {"get": _op(
            "listRegistryModels", "Every adapter and model name with its versions, which serves, and each "
            "version's evidence.", _ok(cp.RegistryList, "Names.", 401, 403),
            links={**_links("name", first, "getRegistryModel"),
                   "rollbackRegistryModel": {"operationId": "rollbackRegistryModel",
                                             "parameters": {"path.name": first},
                                             "requestBody": {"version": "$response.body#/data/0/versions/0/version"}}})},
        "/v1/registry/models/{name}": {"get": _op("getRegistryModel", "One name with its versions.",
                                                  _ok(cp.RegistryEntry, "The name.", 400, 401, 403, 404), [name])},
        "/v1/registry/models/{name}/versions/{version}/metrics": {"get": _op(
            "getRegistryVersionMetrics", "The loss series of the run a version was published from (empty when that "
            "run is no longer on disk).", _ok(cp.MetricsList, "The series.", 400, 401, 403, 404), [name, version])},
        "/v1/registry/models/{name}/rollback": {"post": _op(
            "rollbackRegistryModel", "Point the name at a kept version; servers follow within SERVE_POLL_SECONDS.",
            _ok(cp.RegistryEntry, "The name after the rollback.", 400, 401, 403, 404), [name],
            _json(cp.RollbackRequest), scope="admin")},
    }


def _paths() -> dict:
    """Every route the app serves, with what it answers."""
    return {
        **_finetune_paths(),
        **_registry_paths(),
        "/v1/models": _get("The base model and the loaded adapters (adapters carry `parent`).",
                           {"200": {"description": "Model list.", "content": _json(p.ModelList)},
                            **_errors(401, 503)}, API_KEY),
        "/v1/completions": _generate("Text completion.", p.CompletionRequest, p.CompletionResponse,
                                     p.CompletionChunk),
        "/v1/chat/completions": _generate("Chat completion.", p.ChatCompletionRequest, p.ChatCompletionResponse,
                                          p.ChatCompletionChunk),
        "/admin/adapters": _get("Every adapter in the registry and its state here.",
                                {"200": {"description": "Adapter states.", "content": _json(p.AdapterList)},
                                 **_errors(401, 404, 503)}, ADMIN_KEY),
        "/admin/adapters/{name}/load": _admin_action("Load (or re-enable) a published adapter.", refused=True),
        "/admin/adapters/{name}/unload": _admin_action("Unload an adapter and keep it off until loaded.",
                                                       refused=False),
        "/health": _get("Liveness.", {"200": {"description": "Alive.", "content": _json(p.Health)}}),
        "/ready": _get("Readiness: the model is loaded.", {
            "200": {"description": "Ready.", "content": _json(p.Readiness)},
            "503": {"description": "Loading.", "content": _json(p.Readiness)}}),
        "/metrics": _get("Prometheus metrics.", _text("Prometheus text format.", "text/plain")),
        "/openapi.json": _get("This description.", {"200": {"description": "OpenAPI 3.1.", "content": {
            "application/json": {"schema": {"type": "object"}}}}}),
        "/": _get("The playground page (it asks for the API key).", _text("HTML.", "text/html")),
        "/console": _get("The console page (it asks for a key; docs/console.md).", _text("HTML.", "text/html")),
        "/console/static/{name}": {"get": {  # open: only the files shipped in serve/http/console/ (else 404)
            "summary": "A file of the console page (its scripts, styles, vendored libraries and their licences).",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The file.", "content": {
                t: {"schema": {"type": "string"}} for t in ("text/javascript", "text/css", "text/html", "application/json",
                                                            "text/plain")}}, **_errors(404)}}},
    }


def openapi_spec(served: Served | None = None) -> dict:
    """The OpenAPI 3.1 document; with `served`, narrowed to what that server can answer now."""
    models = [p.CompletionRequest, p.ChatCompletionRequest, p.CompletionResponse, p.CompletionChunk,
              p.ChatCompletionResponse, p.ChatCompletionChunk, p.ModelList, p.ErrorResponse, p.Health,
              p.Readiness, p.AdapterList, p.AdapterAction, *ft.MODELS, *cp.MODELS]
    spec = {
        "openapi": "3.1.0",
        "info": {"title": "tunestack OpenAI-compatible API", "version": "1"},
        "components": {"securitySchemes": SECURITY_SCHEMES, "schemas": _components(models)},
        "paths": _paths(),
    }
    return narrowed(spec, served) if served else spec


def narrowed(spec: dict, served: Served) -> dict:
    """A copy whose request bodies name the served models (enum) and cap max_tokens by the context, whose
    admin paths name the registry's adapters, and whose upload is the example training file."""
    out = copy.deepcopy(spec)
    for path in ("/admin/adapters/{name}/load", "/admin/adapters/{name}/unload"):
        if served.adapters:
            out["paths"][path]["post"]["parameters"][0]["schema"]["enum"] = list(served.adapters)
    upload = out["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    # no schema generates training rows: a fuzzer's positive uploads are the spec's own example (invalid ones: 400)
    upload["properties"]["file"] = {"type": "string", "enum": [upload["example"]["file"]]}
    job = out["components"]["schemas"]["JobCreateRequest"]["properties"]
    job["model"] = {**job["model"], "enum": list(served.models[:1])}  # the base (GET /v1/models lists it first)
    for name in REQUESTS:
        props = out["components"]["schemas"][name]["properties"]
        props["model"] = {**props["model"], "enum": list(served.models)}
        for key in ("max_tokens", "max_completion_tokens"):
            for branch in props[key]["anyOf"]:
                if branch.get("type") == "integer":  # at least one prompt token must fit beside them
                    branch["maximum"] = min(branch["maximum"], served.max_model_len - 1)
            props[key]["description"] = (f"an integer from 1 to {served.max_model_len - 1}, or null; prompt tokens "
                                         f"+ this must be at most {served.max_model_len}")
    return out
