"""Keys with scopes over every route: the route -> scope table covers the app, and each key kind gets 401, 403
or through, as its scopes say. In-process (the Flask test client): the authenticator runs before any route."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from serve.http.app import OPEN_PATHS, build_app
from serve.http.auth import ROUTE_SCOPES
from serve.http.keys import KeyRing, KeysFileError, digest, read_keys_file
from serve.metrics import Metrics
from serve.settings import Settings

API, ADMIN = "api-key-for-scopes-1", "admin-key-for-scopes-2"
NAMED = {"inference": "inference-key-0003", "finetune": "finetune-key-0004", "admin": "admin-only-key-0005"}
KINDS = {"none": (None, set()), "wrong": ("not-a-key-at-all", set()), "api_key": (API, {"inference", "finetune"}),
         "admin_key": (ADMIN, {"inference", "finetune", "admin"}),
         **{f"file:{s}": (k, {s}) for s, k in NAMED.items()}}


def _settings(tmp: Path, **over) -> Settings:
    keys = tmp / "keys.yaml"
    keys.write_text(yaml.safe_dump([{"name": s, "sha256": digest(k), "scopes": [s]} for s, k in NAMED.items()]))
    return Settings(registry=tmp / "registry", api_key=API, admin_key=ADMIN, keys_file=str(keys), **over)


def _rules() -> list[tuple[str, str]]:
    app = build_app(Settings(api_key=API, admin_key=ADMIN), None, Metrics())
    return sorted((r.rule, m) for r in app.url_map.iter_rules() for m in r.methods - {"HEAD", "OPTIONS"}
                  if r.rule not in OPEN_PATHS and not r.rule.startswith("/console"))


def test_every_closed_route_has_a_scope():
    """A new route must be listed in serve/http/auth.py ROUTE_SCOPES (unlisted: admin only)."""
    assert {rule for rule, _ in _rules()} == set(ROUTE_SCOPES)


@pytest.mark.parametrize("rule,method", _rules())
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_key_kind_gets_what_its_scopes_allow(tmp_path, rule, method, kind):
    client = build_app(_settings(tmp_path), None, Metrics()).test_client()
    key, scopes = KINDS[kind]
    url = re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: "v1" if m[1] == "version" else "nothing-here", rule)
    r = client.open(url, method=method, headers={"Authorization": f"Bearer {key}"} if key else {}, json={})
    need = ROUTE_SCOPES[rule]
    if key is None or not scopes:
        assert r.status_code == 401 and r.json["error"]["code"] == "invalid_api_key", r.json
    elif need and need not in scopes:
        assert r.status_code == 403, (kind, rule, r.json)
        assert r.json["error"] == {"message": r.json["error"]["message"], "type": "permission_error",
                                   "param": "authorization", "code": "insufficient_scope"}
    else:
        assert r.status_code not in (401, 403), (kind, rule, r.json)
        assert r.status_code < 500 or r.json["error"]["code"] in ("not_ready", "load_failed"), r.json


def test_without_any_key_v1_is_open_and_admin_is_off(tmp_path):
    c = build_app(Settings(registry=tmp_path / "r"), None, Metrics()).test_client()
    assert c.get("/v1/me", headers={"Authorization": "Bearer sk-placeholder"}).json["scopes"] == [
        "admin", "finetune", "inference"]
    assert c.get("/admin/adapters").status_code == 404
    only_admin = build_app(Settings(registry=tmp_path / "r", admin_key=ADMIN), None, Metrics()).test_client()
    assert only_admin.get("/v1/me").json["scopes"] == ["finetune", "inference"]  # /v1 open as before
    assert only_admin.post("/v1/registry/models/x/rollback", json={"version": "v1"}).status_code == 401


@pytest.mark.parametrize("doc,needle", [
    ([{"name": "a", "key": "plain-text", "scopes": ["admin"]}], "exactly name, sha256 and scopes"),
    ([{"name": "a", "sha256": "abc", "scopes": ["admin"]}], "64 hex digits"),
    ([{"name": "a", "sha256": "0" * 64, "scopes": ["root"]}], "scopes must be"),
    ({"keys": "x"}, "expected a list"),
])
def test_a_bad_keys_file_refuses_the_start(tmp_path, doc, needle):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(KeysFileError, match=needle):
        read_keys_file(path)
    with pytest.raises(KeysFileError):
        build_app(Settings(registry=tmp_path, keys_file=str(path)), None, Metrics())


def test_named_keys_own_their_files(tmp_path):
    ring = KeyRing(API, "", None)
    assert ring.caller(API).owner == digest(API)[:16]  # equal to serve.finetune.api.owner_of: old jobs stay visible
    from serve.finetune.api import owner_of

    assert owner_of(API) == ring.caller(API).owner
