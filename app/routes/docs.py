"""The API docs: Swagger UI at /docs and ReDoc at /redoc, from assets vendored into app/web/vendor
by scripts/vendor-web.sh (no CDN, works offline). Swagger UI 5 and ReDoc 2 render OpenAPI 3.1,
which FastAPI serves. The pages, their assets and /openapi.json need no token (app/auth.py), so
they load before a user has one to give; Swagger's Authorize button takes it for the calls.

Both pages carry a Content-Security-Policy that lets them load nothing from elsewhere: ReDoc's
sidebar shows a logo from its CDN (hidden when it fails), and Swagger UI would ask an online
validator for a badge. Swagger's page starts from an inline script, hence 'unsafe-inline'; ReDoc
runs its search index in a worker made from a blob."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)
VENDOR_URL = "/vendor"
VENDOR_DIR = Path(__file__).resolve().parents[1] / "web" / "vendor"
FAVICON = f"{VENDOR_URL}/swagger-ui/favicon-32x32.png"
SAME_ORIGIN_ONLY = {"Content-Security-Policy": "; ".join((
    "default-src 'self'", "script-src 'self' 'unsafe-inline'", "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data:", "font-src 'self' data:", "worker-src 'self' blob:", "connect-src 'self'",
    "frame-ancestors 'self'", "base-uri 'self'", "form-action 'self'"))}


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title="sdmerge API",
        swagger_js_url=f"{VENDOR_URL}/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{VENDOR_URL}/swagger-ui/swagger-ui.css", swagger_favicon_url=FAVICON,
        swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None},  # the token survives a reload
    )
    page.headers.update(SAME_ORIGIN_ONLY)
    return page


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    page = get_redoc_html(openapi_url=request.app.openapi_url, title="sdmerge API",
                          redoc_js_url=f"{VENDOR_URL}/redoc/redoc.standalone.js", redoc_favicon_url=FAVICON,
                          with_google_fonts=False)
    page.headers.update(SAME_ORIGIN_ONLY)
    return page
