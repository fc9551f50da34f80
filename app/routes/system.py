"""Liveness and readiness."""

from __future__ import annotations

import shutil

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.bodies import SafeJsonRoute
from app.deps import RuntimeDep
from app.schemas import ReadyOut

router = APIRouter(tags=["system"], route_class=SafeJsonRoute)


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", response_model=ReadyOut, responses={503: {"model": ReadyOut, "description": "not ready"}})
def ready(runtime: RuntimeDep) -> JSONResponse:
    disk = _disk(runtime.settings)
    checks = {"database": _check(lambda: _ping_database(runtime)), "broker": _check(lambda: _ping_broker(runtime)),
              "disk": disk.pop("check")}
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks, "disk": disk},
                        200 if ok else 503)


def _disk(settings) -> dict:
    """Free space where the database, uploads and artifacts go (SDMERGE_MIN_FREE_BYTES)."""
    try:
        usage = shutil.disk_usage(settings.data_dir)
    except OSError as exc:
        return {"check": f"error: {exc.strerror}", "free_bytes": None, "min_free_bytes": settings.min_free_bytes}
    low = usage.free < settings.min_free_bytes
    return {"check": f"error: {usage.free:,} bytes free, below {settings.min_free_bytes:,}" if low else "ok",
            "free_bytes": usage.free, "total_bytes": usage.total, "min_free_bytes": settings.min_free_bytes}


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

