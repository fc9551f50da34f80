"""Liveness, readiness, and the API docs served from local assets (no CDN, works offline)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import text

from app.deps import RuntimeDep

router = APIRouter(tags=["system"])
DOCS_ASSETS = "/docs/assets"


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
def ready(runtime: RuntimeDep) -> JSONResponse:
    checks = {"database": _check(lambda: _ping_database(runtime)), "broker": _check(lambda: _ping_broker(runtime))}
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, 200 if ok else 503)


def _ping_database(runtime) -> None:
    with runtime.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _ping_broker(runtime) -> None:
    with runtime.celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


def _check(probe) -> str:
    try:
        probe()
        return "ok"
    except Exception as exc:  # readiness reports any failure instead of raising it
        return f"error: {type(exc).__name__}: {exc}"


@router.get("/docs", include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title="sdmerge API",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
    )
