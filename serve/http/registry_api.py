"""The registry over HTTP: names, versions, which version serves, each version's evidence; rollback.

    GET  /v1/registry/models                                      every adapter and model name
    GET  /v1/registry/models/{name}                               one name with its versions
    GET  /v1/registry/models/{name}/versions/{version}/metrics    the run's loss series
    POST /v1/registry/models/{name}/rollback  {"version": "v1"}   point the name at a kept version (admin)

Reads and rollback go through artifacts.Registry; the server's adapter sync follows a rollback on its
next poll (SERVE_POLL_SECONDS), as it follows a publish.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from flask import Flask, request

from artifacts import Manifest, Registry, RegistryError, RunDir, validate_name
from artifacts.evidence import evidence
from artifacts.run_metrics import read_series
from serve.errors import APIError, bad_request, parse_body
from serve.http.console_protocol import RollbackRequest
from serve.http.routes import json_response
from serve.openai.backend import json_body

KINDS = {"adapters": "adapter", "models": "model"}  # registry folder -> the entry's kind
_VERSION = re.compile(r"^v([1-9][0-9]{0,5})$")


def _epoch(iso: str | None) -> int:
    try:
        return int(datetime.fromisoformat(str(iso)).timestamp())
    except ValueError:
        return 0


def _run(m: Manifest | None) -> Path | None:
    run = (m.extra.get("run") if m else None) or None
    return Path(run) if isinstance(run, str) else None


def version_public(version: int, serving: bool, m: Manifest | None) -> dict[str, Any]:
    ev = evidence(m.metrics, _run(m), m.extra.get("gate")) if m is not None else None
    return {"version": f"v{version}", "created_at": _epoch(m.extra.get("published_at") or m.created_at) if m else 0,
            "serving": serving, "evidence": ev.public() if ev else None}


class RegistryAPI:
    def __init__(self, root: Path):
        self.registry = Registry(root)

    def _kind(self, name: str) -> str:
        """The registry folder holding `name`: 400 for a name that is no name, 404 for one not published."""
        try:
            validate_name(name)
        except RegistryError as e:
            raise bad_request(str(e), "name") from None
        for kind in KINDS:
            if name in self.registry.names(kind, versions=False) or self.registry.versions(kind, name):
                return kind
        raise APIError(404, f"{name!r} is not in the registry", "name", "not_found")

    def entry(self, name: str, kind: str | None = None) -> dict[str, Any]:
        kind = kind or self._kind(name)
        versions = self.registry.versions(kind, name)
        serving = self.registry.serving_version(kind, name)
        return {"name": name, "kind": KINDS[kind], "serving_version": f"v{serving}" if serving else None,
                "versions": [version_public(v.version, v.serving, v.manifest) for v in versions]}

    def list(self) -> dict[str, Any]:
        data = [self.entry(n, kind) for kind in KINDS for n in self.registry.names(kind, versions=False)]
        return {"object": "list", "data": data}

    def _version(self, name: str, kind: str, version: Any) -> int:
        m = _VERSION.match(version) if isinstance(version, str) else None
        if m is None:
            raise bad_request(f"version must be 'v<N>' (e.g. 'v1'), got {version!r}", "version")
        if int(m[1]) not in [v.version for v in self.registry.versions(kind, name)]:
            raise APIError(404, f"{name!r} has no version {version} (see GET /v1/registry/models/{name})",
                           "version", "not_found")
        return int(m[1])

    def rollback(self, name: str, body: Any) -> dict[str, Any]:
        req = parse_body(RollbackRequest, body)
        kind = self._kind(name)
        version = self._version(name, kind, req.version)
        try:
            self.registry.rollback(kind, name, version)
        except RegistryError as e:  # the kept version fails its checksums: refused, the name keeps serving
            raise bad_request(str(e), "version", "version_unverified") from None
        return self.entry(name, kind)

    def metrics(self, name: str, version: str) -> dict[str, Any]:
        kind = self._kind(name)
        n = self._version(name, kind, version)
        m = next(v.manifest for v in self.registry.versions(kind, name) if v.version == n)
        run = _run(m)
        series = read_series(RunDir(run).metrics_log) if run is not None else []
        return {"object": "list", "data": [p.public() for p in series]}


def registry_routes(app: Flask, root: Path) -> None:
    api = RegistryAPI(root)
    app.add_url_rule("/v1/registry/models", "registry_list", lambda: json_response(api.list()), methods=["GET"])
    app.add_url_rule("/v1/registry/models/<name>", "registry_get", lambda name: json_response(api.entry(name)),
                     methods=["GET"])
    app.add_url_rule("/v1/registry/models/<name>/versions/<version>/metrics", "registry_version_metrics",
                     lambda name, version: json_response(api.metrics(name, version)), methods=["GET"])
    app.add_url_rule("/v1/registry/models/<name>/rollback", "registry_rollback",
                     lambda name: json_response(api.rollback(name, json_body(request.get_data(cache=False)))),
                     methods=["POST"])
