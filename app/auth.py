"""Bearer-token check for every request except liveness and the API docs.

The docs pages, their vendored assets and /openapi.json are open: a browser loads them before a
user has given a token (Swagger's Authorize button takes it), and they describe the API, not data.
Routing matches the same raw path, so a path under /vendor/ only ever reaches the static files.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import Unauthorized, error_body

OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/redoc"})
OPEN_PREFIXES = ("/vendor/",)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


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
        from starlette.responses import JSONResponse

        error = Unauthorized("missing or wrong bearer token (Authorization: Bearer …)")
        response = JSONResponse(error_body(error.code, error.message), 401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
