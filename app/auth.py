"""Bearer-token check for every request except /health, including docs and the OpenAPI file."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import Unauthorized, error_body

OPEN_PATHS = frozenset({"/health"})


class BearerTokenMiddleware:
    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
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
