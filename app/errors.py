"""Service errors and the one place where every domain error becomes an HTTP answer.

Errors users cause are `SdmergeError`s (the engine's, plus the few below that only the service
can raise); each has a `code`, and `STATUS_BY_CODE` is the whole mapping to HTTP statuses.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from merge_engine.errors import SdmergeError

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
    "not_found": 404,
    "payload_too_large": 413,
    "bad_request": 400,
    "unauthorized": 401,
}


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
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal server error"), 500)
