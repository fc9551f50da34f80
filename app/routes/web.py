"""The dashboard: one HTML shell and its static scripts, served by the API itself (no CDN, no
front-end server), so it works on an offline GPU box. The pages call the same REST API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"
router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui")
def ui_slash() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui/")
def ui() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    """Mounted at /ui/static: the scripts, styles and vendored assets."""
    return StaticFiles(directory=STATIC)
