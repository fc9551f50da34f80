"""Liveness, readiness, the deployment's status (`sdmerge status`) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.bodies import SafeJsonRoute
from app.deps import RuntimeDep
from app.schemas import ReadyOut, StatusOut
from app.services.status import disk_usage, snapshot

router = APIRouter(tags=["system"], route_class=SafeJsonRoute)


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", response_model=ReadyOut, responses={503: {"model": ReadyOut, "description": "not ready"}})
def ready(runtime: RuntimeDep) -> JSONResponse:
    disk = disk_usage(runtime.settings)
    checks = {"database": _check(lambda: _ping_database(runtime)), "broker": _check(lambda: _ping_broker(runtime)),
              "disk": disk.pop("check")}
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks, "disk": disk},
                        200 if ok else 503)


@router.get("/system/status", response_model=StatusOut)
def system_status(runtime: RuntimeDep) -> dict:
    """Queues, workers, running work with its progress, counts by kind and status, recent
    failures and free space: what `sdmerge status` shows."""
    with runtime.sessions() as session:
        return snapshot(runtime, session)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Prometheus' text format, computed from the database, the broker and the workers' presence
    at scrape time (app/metrics.py). Behind the API token like every non-public route."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


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

