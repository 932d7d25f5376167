"""The console page at /console and its static files: a pure client of the documented API (docs/console.md).

The page and its files are open (like the playground): they hold no data, and every API call the page makes
carries the key the user typed. Only the files shipped in serve/http/console/ are served, by exact name.
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask, Response, send_file

from serve.errors import APIError

CONSOLE_DIR = Path(__file__).with_name("console")
PAGE = "/console"
STATIC = "/console/static/"
STATIC_RULE = STATIC + "<path:name>"
MIMETYPES = {".html": "text/html", ".mjs": "text/javascript", ".js": "text/javascript", ".css": "text/css",
             ".json": "application/json", ".LICENSE": "text/plain", ".png": "image/png", ".svg": "image/svg+xml"}
# revalidate every time (ETag/Last-Modified make that a 304): an upgraded wheel's page never runs stale JS
CACHE_CONTROL = "no-cache"


def static_files() -> dict[str, Path]:
    """URL path -> file, for every servable file shipped under console/ (fixed at install time)."""
    out = {}
    for p in sorted(CONSOLE_DIR.rglob("*")):
        if p.is_file() and p.suffix in MIMETYPES and "__pycache__" not in p.parts:
            out[STATIC + p.relative_to(CONSOLE_DIR).as_posix()] = p
    return out


def open_paths() -> frozenset[str]:
    """The page and its static route: open to the authenticator, which matches a path or a route's rule. The
    route answers only the shipped files (any other name: 404), so opening it opens nothing else."""
    return frozenset({PAGE, STATIC_RULE})


def console_routes(app: Flask) -> None:
    files = static_files()

    @app.get(PAGE)
    def console_page():
        return _send(CONSOLE_DIR / "index.html")

    @app.get(STATIC_RULE)
    def console_static(name: str):
        path = files.get(STATIC + name)  # a lookup, never a join: "../" or an absolute name finds nothing
        if path is None:
            raise APIError(404, f"no console file {name!r}", code="not_found")
        return _send(path)


def _send(path: Path) -> Response:
    r = send_file(path, mimetype=MIMETYPES[path.suffix], conditional=True, etag=True, max_age=None)
    r.headers["Cache-Control"] = CACHE_CONTROL
    r.headers["X-Content-Type-Options"] = "nosniff"
    return r
