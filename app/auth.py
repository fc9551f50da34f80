"""Bearer-token check for every request except liveness, the API docs and the dashboard's own
files (HTML shells, scripts, styles: they hold no data, and a browser loads them before a user
has given a token; Swagger's Authorize button and the dashboard's dialog ask for it).
/openapi.json is open too: it describes the API, not data. Routing matches the same raw path,
so a path under /vendor/ or /ui/static/ only ever reaches the static files.

The token comes in `Authorization: Bearer …`, or, for reads only (GET and HEAD), in the
dashboard's `sdmerge_token` cookie: the browser sends no header with an `<img>` or a download
link. The dashboard sets that cookie SameSite=Strict for its session, so another site's page
cannot make the browser send it, and a cookie alone never changes anything."""

from __future__ import annotations

import secrets
from http.cookies import CookieError, SimpleCookie
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import Unauthorized, error_body

OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/redoc", "/", "/ui", "/ui/"})
OPEN_PREFIXES = ("/vendor/", "/ui/static/")
COOKIE = "sdmerge_token"
READS = frozenset({"GET", "HEAD"})


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or (path.startswith(OPEN_PREFIXES) and ".." not in path)


class BearerTokenMiddleware:
    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or is_open(scope["path"]):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(given, self.token):
            return await self.app(scope, receive, send)
        if scope["method"] in READS and secrets.compare_digest(_cookie(headers.get(b"cookie", b"")), self.token):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        error = Unauthorized("missing or wrong bearer token (Authorization: Bearer …)")
        response = JSONResponse(error_body(error.code, error.message), 401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _cookie(header: bytes) -> bytes:
    try:
        morsel = SimpleCookie(header.decode("latin-1")).get(COOKIE)
    except CookieError:
        return b""
    return unquote(morsel.value).encode() if morsel else b""  # the dashboard writes it URI-encoded
