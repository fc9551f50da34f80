"""Service errors and the one place where every domain error becomes an HTTP answer.

Errors users cause are `SdmergeError`s (the engine's, plus the few below that only the service
can raise); each has a `code`, and `STATUS_BY_CODE` is the whole mapping to HTTP statuses.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from merge_engine.errors import SdmergeError, StorageError

log = logging.getLogger(__name__)


class NotFound(SdmergeError):
    code = "not_found"


class Conflict(SdmergeError):
    """The request clashes with what exists (a name taken, a finished job, an artifact in use)."""

    code = "conflict"


class ModelNotReady(SdmergeError):
    code = "model_not_ready"


class PathNotAllowed(SdmergeError):
    """A path outside every model root, or a symlink leading out of one."""

    code = "path_not_allowed"


class PayloadTooLarge(SdmergeError):
    code = "payload_too_large"


class InvalidAnalysis(SdmergeError):
    """An analysis request the engine would refuse (too few models, unknown component or metric);
    the same code as the engine's own `AnalysisError`, which the API cannot import (torch)."""

    code = "invalid_analysis"


class InvalidPreview(SdmergeError):
    """A preview request without targets, or with a target that is not a model, merge or recipe."""

    code = "invalid_preview"


class BadRequest(SdmergeError):
    code = "bad_request"


class Unauthorized(SdmergeError):
    code = "unauthorized"


class DatabaseUnavailable(SdmergeError):
    """The database refused or dropped the request (locked, down, out of connections)."""

    code = "database_unavailable"


def storage_error(exc: BaseException, sqlite_file: str | None = None) -> StorageError | None:
    """The disk-full error hiding in `exc`: an OSError, or the database saying it is full, or a
    SQLite I/O error on a disk without free space (SQLite reports a failed WAL or shared-memory
    write as "disk I/O error", not as full)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return StorageError(f"no space left on the device: {exc.strerror}", details={"path": exc.filename or ""})
    if isinstance(exc, DBAPIError):
        orig, name = exc.orig, getattr(exc.orig, "sqlite_errorname", "") or ""
        full = name == "SQLITE_FULL" or getattr(orig, "sqlstate", None) == POSTGRES_DISK_FULL
        if not full and name.startswith("SQLITE_IOERR") and sqlite_file:
            try:
                full = shutil.disk_usage(os.path.dirname(sqlite_file) or ".").free < 1 << 20
            except OSError:
                full = False
        if full:
            return StorageError("the database has no space left on its disk")
    return None


STATUS_BY_CODE = {
    "invalid_recipe": 422,
    "unknown_model": 422,
    "bad_checkpoint": 422,
    "architecture_mismatch": 422,
    "layout_mismatch": 422,
    "non_finite": 422,
    "invalid_request": 422,
    "path_not_allowed": 422,
    "invalid_analysis": 422,
    "invalid_preview": 422,
    "invalid_options": 422,
    "cancelled": 409,
    "conflict": 409,
    "model_not_ready": 409,
    "input_changed": 409,
    "not_found": 404,
    "payload_too_large": 413,
    "bad_request": 400,
    "malformed_json": 400,
    "unauthorized": 401,
    "insufficient_storage": 507,
    "database_unavailable": 503,
}
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
POSTGRES_DISK_FULL = "53100"


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers at this request's path."""
    methods: set[str] = set()
    for route in _routes(request.app.router.routes):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ("GET", "HEAD"))  # a mount serves files
    return sorted(methods)


def _routes(routes: list) -> Iterator:
    for route in routes:  # FastAPI wraps an included router; its own routes are inside
        inner = getattr(route, "original_router", None)
        yield from _routes(inner.routes) if inner is not None else (route,)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SdmergeError)
    async def _domain(_request: Request, exc: SdmergeError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.code == "unauthorized" else None
        return JSONResponse({"error": exc.to_dict()}, STATUS_BY_CODE.get(exc.code, 400), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = json.loads(json.dumps(exc.errors(), default=str))
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body("malformed_json", "request body is not valid JSON",
                                           {"errors": errors}), 400)
        first = errors[0] if errors else {}
        path = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        return JSONResponse(error_body("invalid_request", f"invalid request at {path}: {first.get('msg')}",
                                       {"errors": errors}), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
                413: "payload_too_large"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the methods of the first route of the path only
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=headers)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        if (full := storage_error(exc)) is not None:
            return await _domain(request, full)
        return await _bug(request, exc)

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        engine = request.app.state.runtime.engine
        sqlite_file = engine.url.database if engine.dialect.name == "sqlite" else None
        if (full := storage_error(exc, sqlite_file)) is not None:
            return await _domain(request, full)
        if isinstance(exc, DataError):  # a value the database cannot hold or compare (a NUL byte, a huge number)
            return JSONResponse(error_body("bad_request", f"the database refuses a value of the request: "
                                           f"{str(exc.orig).splitlines()[0][:200]}"), 400)
        if isinstance(exc, OperationalError):  # locked, gone, out of connections: worth a retry
            log.warning("database unavailable: %s", exc.orig)
            error = DatabaseUnavailable("the database is unavailable; retry shortly")
            return JSONResponse({"error": error.to_dict()}, 503, headers={"Retry-After": "5"})
        return await _bug(request, exc)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal server error"), 500)
