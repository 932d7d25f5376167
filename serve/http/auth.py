"""Who may call what: each route's scope, and the check that runs before every request.

A route missing from ROUTE_SCOPES needs the admin scope: a new route is closed by default, and
tests/serve/test_console_auth.py fails until it is listed here.
"""

from __future__ import annotations

from typing import Callable

from flask import g, request

from serve.errors import APIError
from serve.http.keys import Caller, KeyRing
from serve.process.drain import Drain

ANY = ""  # any caller the server accepts: GET /v1/me answers what the caller may do
ROUTE_SCOPES: dict[str, str] = {
    "/v1/me": ANY,
    "/v1/models": "inference", "/v1/completions": "inference", "/v1/chat/completions": "inference",
    "/v1/files": "finetune", "/v1/files/<fid>": "finetune", "/v1/files/<fid>/content": "finetune",
    "/v1/files/<fid>/preview": "finetune",
    "/v1/fine_tuning/methods": "finetune",
    "/v1/fine_tuning/jobs": "finetune", "/v1/fine_tuning/jobs/<jid>": "finetune",
    "/v1/fine_tuning/jobs/<jid>/cancel": "finetune", "/v1/fine_tuning/jobs/<jid>/events": "finetune",
    "/v1/fine_tuning/jobs/<jid>/checkpoints": "finetune", "/v1/fine_tuning/jobs/<jid>/metrics": "finetune",
    "/v1/fine_tuning/jobs/<jid>/evaluation": "finetune",
    "/v1/fine_tuning/jobs/<jid>/publish": "admin",
    "/v1/registry/models": "finetune", "/v1/registry/models/<name>": "finetune",
    "/v1/registry/models/<name>/versions/<version>/metrics": "finetune",
    "/v1/registry/models/<name>/rollback": "admin",
    "/admin/adapters": "admin", "/admin/adapters/<path:name>/load": "admin",
    "/admin/adapters/<path:name>/unload": "admin",
}


def route_scope(rule: str | None) -> str:
    """The scope a matched rule needs; an unmatched path (404, 405) needs only an accepted caller."""
    if rule is None:
        return ANY
    return ROUTE_SCOPES.get(rule, "admin")


def current_caller() -> Caller | None:
    """The caller of this request (None outside one, e.g. a unit test calling the API object)."""
    return g.get("tunestack_caller")


def authenticator(ring: KeyRing, drain: Drain, open_paths: frozenset[str]) -> Callable[[], None]:
    """Paths (or rules) in `open_paths` need no key. Else: 401 for a missing or wrong key, 403 insufficient_scope for a key without the route's scope; /admin/*
    is off (404) where no key holds the admin scope. Then, while draining, new requests get 503."""
    # an open rule's fixed prefix (the console's "/console/static/<path:name>") is open for every method, so an
    # undeclared one gets its 405, not a 401 (a request matching no rule has no url_rule to compare)
    prefixes = tuple(p.split("<", 1)[0] for p in open_paths if "<" in p)

    def check() -> None:
        rule = request.url_rule.rule if request.url_rule is not None else None
        if request.path in open_paths or rule in open_paths or (prefixes and request.path.startswith(prefixes)):
            return
        if request.path.startswith("/admin") and not ring.admin_on:
            raise APIError(404, "admin API is off (set SERVE_ADMIN_KEY or an admin key in SERVE_KEYS_FILE)")
        got = request.headers.get("Authorization", "")
        caller = ring.caller(got[7:] if got.startswith("Bearer ") else None)
        if caller is None:
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
        scope = route_scope(rule)
        if scope and scope not in caller.scopes:
            if caller.key is None:
                raise APIError(401, f"this needs a key with the {scope} scope", code="invalid_api_key")
            raise APIError(403, f"key {caller.key.name!r} lacks the {scope} scope", "authorization",
                           "insufficient_scope")
        g.tunestack_caller = caller
        if drain.draining:
            raise APIError(503, "server is shutting down; retry on another replica", code="draining")
    return check
