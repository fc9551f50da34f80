"""Request bodies: bounded before they are read, decoded off the event loop, never a crash.

One 100 MB JSON body once took minutes and gigabytes in the API process and stalled every other
request. So a JSON body larger than `SDMERGE_MAX_JSON_BYTES` is refused (413) before a byte of it
is parsed: from its Content-Length, or while it streams in (chunked); uploads, which stream to
disk, have their own limit. A body within the limit is decoded in a worker thread by
`merge_engine.jsonsafe` (nesting depth and number sizes bounded), so no body can hold the loop
or raise a RecursionError; a body it refuses is a 400 like any other malformed JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import anyio.to_thread
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BadRequest, PayloadTooLarge, error_body
from merge_engine import jsonsafe

UPLOAD_PREFIX = "/models/upload/"  # streamed to disk under SDMERGE_MAX_UPLOAD_BYTES instead
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodyLimitMiddleware:
    """Reads a request's whole body (at most `limit` bytes) before the app sees it, or answers
    413 without reading further."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS or scope["path"].startswith(UPLOAD_PREFIX):
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            return await self._refuse(scope, receive, send, declared)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send, None)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnects, as from the server

        return await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, declared: int | None) -> None:
        size = f"of {declared:,} bytes " if declared is not None else ""
        error = PayloadTooLarge(f"request body {size}exceeds the limit of {self.limit:,} bytes (SDMERGE_MAX_JSON_BYTES)",
                                details={"limit": self.limit})
        # The rest of the body is not read: the connection closes after this answer.
        response = JSONResponse(error_body(error.code, error.message, error.details), 413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class SafeJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await anyio.to_thread.run_sync(decode_body, body)
        return self._json


def decode_body(body: bytes) -> Any:
    """The body as JSON; anything jsonsafe refuses is a JSON error, which FastAPI answers 400."""
    try:
        return jsonsafe.loads(body, what="the request body", error=BadRequest)
    except BadRequest as exc:
        raise json.JSONDecodeError(exc.message, "", 0) from None


class SafeJsonRoute(APIRoute):
    """A route whose JSON body is decoded by `SafeJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(SafeJsonRequest(request.scope, request.receive))

        return route
