"""API keys and their scopes: who a request is and what it may do.

    inference   /v1/models, /v1/completions, /v1/chat/completions
    finetune    /v1/files*, /v1/fine_tuning/*, reading /v1/registry/*
    admin       publish (gate override), rollback, /admin/*

Keys come from SERVE_API_KEY (inference + finetune), SERVE_ADMIN_KEY (every scope) and SERVE_KEYS_FILE, a
YAML or JSON list of `{name, sha256, scopes}`: the file holds the sha256 of each key, never the key, so a
leaked file grants nothing. A request's scopes are those of its key; without one (or with a token that is no
key), those open to anyone: every scope when no key is set at all (local use; /admin/* stays off), every scope
but admin when only SERVE_ADMIN_KEY is set (/v1 open as before), none once SERVE_API_KEY or a keys file is set.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import yaml

SCOPES = ("inference", "finetune", "admin")


@dataclass(frozen=True)
class Key:
    """One key, known by its digest; `owner` scopes the files and jobs it creates."""

    name: str
    sha256: str
    scopes: frozenset[str]

    @property
    def owner(self) -> str:
        return self.sha256[:16]  # as serve.finetune.api.owner_of(key): jobs made under SERVE_API_KEY stay its own


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key, or nobody (key None), and the scopes that gives."""

    key: Key | None
    scopes: frozenset[str]

    @property
    def owner(self) -> str | None:
        """Files and jobs are scoped to the key; without one (local use) they are everyone's."""
        return self.key.owner if self.key else None

    @property
    def reads_all(self) -> bool:
        """An admin key sees every key's files and jobs (to publish or cancel them)."""
        return "admin" in self.scopes


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeysFileError(ValueError):
    """SERVE_KEYS_FILE is unreadable or malformed; the message names the entry."""


def read_keys_file(path: Path) -> list[Key]:
    """`[{name, sha256, scopes}]`, or `{keys: [...]}`; every field checked, a bad entry refuses the start."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise KeysFileError(f"SERVE_KEYS_FILE {path}: {e}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise KeysFileError(f"SERVE_KEYS_FILE {path}: expected a list of {{name, sha256, scopes}}")
    out = []
    for i, e in enumerate(entries):
        where = f"SERVE_KEYS_FILE {path}: entry {i}"
        if not isinstance(e, dict) or set(e) != {"name", "sha256", "scopes"}:
            raise KeysFileError(f"{where}: needs exactly name, sha256 and scopes (the key's sha256, never the key)")
        sha, scopes = str(e["sha256"]).lower(), e["scopes"]
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise KeysFileError(f"{where}: sha256 must be 64 hex digits (sha256sum of the key)")
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
            raise KeysFileError(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}")
        out.append(Key(str(e["name"]), sha, frozenset(scopes)))
    return out


class KeyRing:
    """Every configured key; `caller()` says who a bearer token is."""

    def __init__(self, api_key: str = "", admin_key: str = "", keys_file: Path | None = None):
        self.keys: list[Key] = []
        if api_key:
            self.keys.append(Key("api_key", digest(api_key), frozenset({"inference", "finetune"})))
        if admin_key:
            self.keys.append(Key("admin_key", digest(admin_key), frozenset(SCOPES)))
        if keys_file:
            self.keys += read_keys_file(keys_file)
        # only SERVE_ADMIN_KEY set: /v1 stays open as before, the admin scope needs the key
        closed = bool(api_key or keys_file)
        self.anonymous = frozenset() if closed else frozenset(SCOPES) - ({"admin"} if admin_key else set())

    @property
    def admin_on(self) -> bool:
        """/admin/* is served only where some key holds the admin scope."""
        return any("admin" in k.scopes for k in self.keys)

    def caller(self, token: str | None) -> Caller | None:
        """The caller a token is. No token, or one that is no key: the anonymous caller (an open server ignores
        the placeholder key SDKs send); None where anonymous callers may do nothing (401)."""
        d = digest(token or "")
        for k in self.keys:
            if token and hmac.compare_digest(d, k.sha256):  # constant time
                return Caller(k, k.scopes)
        return Caller(None, self.anonymous) if self.anonymous else None
