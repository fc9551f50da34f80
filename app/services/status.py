"""The deployment as it stands, from its sources of truth: the SQL rows (work by kind and state,
running work and its progress, durations, throughput, re-claims after a lapsed lease), the
broker (messages waiting per queue), the workers' presence files and the data dir's free space.
Read at request time by `GET /system/status` (the `sdmerge status` view) and `GET /metrics`, so
any number of API processes report the same figures.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.broker import depth
from app.models import (
    JOB_STATUSES,
    MODEL_STATUSES,
    Analysis,
    Job,
    Leased,
    MergeShard,
    Model,
    Preview,
    utcnow,
)
from app.presence import read_workers
from app.queue import QUEUES
from app.runtime import Runtime
from app.settings import Settings

# The kind of work as users name it (a merge job's table calls itself "job").
KINDS: dict[str, type[Leased]] = {"merge": Job, "shard": MergeShard, "analysis": Analysis, "preview": Preview}
KIND_OF_TABLE = {table.kind: label for label, table in KINDS.items()}
FINISHED = ("succeeded", "failed", "cancelled")
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
RECENT_FAILURES = 5


def snapshot(runtime: Runtime, session: Session) -> dict[str, Any]:
    """The body of `GET /system/status`."""
    now = utcnow()
    return {
        "time": _iso(now),
        "broker": queue_depths(runtime),
        "workers": [_kind_named(w) for w in read_workers(runtime.settings)],
        "work": work_counts(session),
        "running": running(session, now),
        "recent_failures": recent_failures(session),
        "disk": disk_usage(runtime.settings),
    }


def _kind_named(worker: dict) -> dict:
    """A presence file names the work by its table's kind; the status, as users do."""
    if worker.get("running"):
        worker["running"] = {**worker["running"], "kind": KIND_OF_TABLE.get(worker["running"]["kind"],
                                                                            worker["running"]["kind"])}
    return worker


def work_counts(session: Session) -> dict[str, dict[str, int]]:
    """{kind: {status: rows}} for every kind and status (zeros included), and models by status."""
    counts = {kind: dict.fromkeys(JOB_STATUSES, 0) for kind in KINDS}
    for kind, table in KINDS.items():
        for status, n in session.execute(select(table.status, func.count()).group_by(table.status)):
            counts[kind][status] = n
    counts["model"] = dict.fromkeys(MODEL_STATUSES, 0)
    for status, n in session.execute(select(Model.status, func.count()).group_by(Model.status)):
        counts["model"][status] = n
    return counts


def running(session: Session, now: datetime) -> list[dict[str, Any]]:
    """Every running row, oldest first: its progress, how long it has run, when its lease was
    last renewed (each heartbeat updates the row)."""
    found = []
    for kind, table in KINDS.items():
        name = getattr(table, "name", None)  # merges are named, other work is not
        columns = [table.id, table.progress, table.started_at, table.updated_at, table.attempts,
                   table.lease_expires_at, *([name] if name is not None else [])]
        for row in session.execute(select(*columns).where(table.status == "running")):
            seconds = (now - row.started_at).total_seconds() if row.started_at else None
            found.append({
                "kind": kind, "id": row.id, "name": row.name if name is not None else None,
                "attempts": row.attempts, "started_at": _iso(row.started_at),
                "running_seconds": round(seconds, 3) if seconds is not None else None,
                "heartbeat_age_seconds": round(max((now - row.updated_at).total_seconds(), 0.0), 3),
                "lease_expired": row.lease_expires_at is not None and row.lease_expires_at < now,
                "progress": _with_rate(row.progress, seconds),
            })
    return sorted(found, key=lambda r: r["started_at"] or "")


def _with_rate(progress: dict | None, seconds: float | None) -> dict | None:
    """A preview's progress counts images; its rate is images per second of running."""
    if progress and "images_done" in progress and seconds:
        return {**progress, "rate_images_per_second": progress["images_done"] / seconds}
    return progress


def recent_failures(session: Session, limit: int = RECENT_FAILURES) -> list[dict[str, Any]]:
    found = []
    for kind, table in KINDS.items():
        query = select(table).where(table.status == "failed").order_by(table.finished_at.desc()).limit(limit)
        for row in session.scalars(query):
            error = row.error or {}
            found.append({"kind": kind, "id": row.id, "name": getattr(row, "name", None),
                          "finished_at": _iso(row.finished_at),
                          "error": {"code": error.get("code"), "message": error.get("message")}})
    return sorted(found, key=lambda r: r["finished_at"] or "", reverse=True)[:limit]


def queue_depths(runtime: Runtime) -> dict[str, Any]:
    """{"status": "ok", "queues": {queue: messages waiting}}, or the error and no queues."""
    try:
        with runtime.celery.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
            return {"status": "ok", "queues": {queue: depth(connection, queue) for queue in QUEUES}}
    except Exception as exc:  # noqa: BLE001 - the status reports a broker that is down
        return {"status": f"error: {type(exc).__name__}: {exc}", "queues": {}}


def disk_usage(settings: Settings) -> dict[str, Any]:
    """Free space where the database, uploads and artifacts go (SDMERGE_MIN_FREE_BYTES); `check`
    is "ok" or what is wrong."""
    try:
        usage = shutil.disk_usage(settings.data_dir)
    except OSError as exc:
        return {"check": f"error: {exc.strerror}", "free_bytes": None, "min_free_bytes": settings.min_free_bytes}
    low = usage.free < settings.min_free_bytes
    return {"check": f"error: {usage.free:,} bytes free, below {settings.min_free_bytes:,}" if low else "ok",
            "free_bytes": usage.free, "total_bytes": usage.total, "min_free_bytes": settings.min_free_bytes}


# -- aggregates for /metrics ------------------------------------------------------------------------

def lease_expiries(session: Session) -> dict[str, int]:
    """Per kind, how many times work was claimed again after a lease lapsed: a row is claimed
    again only once its lease expired (worker/lease.py `claim`), so each attempt after the first
    follows one expiry."""
    return {kind: int(session.scalar(select(func.coalesce(func.sum(table.attempts - 1), 0))
                                     .where(table.attempts > 1)) or 0)
            for kind, table in KINDS.items()}


def durations(session: Session) -> dict[tuple[str, str], dict[str, Any]]:
    """{(kind, status): {"buckets": [rows at or under each bound], "count", "sum"}} of finished
    work that started (the seconds from its first claim to its end), counted by the database."""
    found = {}
    for kind, table in KINDS.items():
        seconds = _seconds_between(session, table.started_at, table.finished_at)
        bucket_sums = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
        query = (select(table.status, func.count(), func.coalesce(func.sum(seconds), 0.0), *bucket_sums)
                 .where(table.status.in_(FINISHED), table.started_at.is_not(None), table.finished_at.is_not(None))
                 .group_by(table.status))
        for status, count, total, *buckets in session.execute(query):
            found[(kind, status)] = {"count": count, "sum": float(total), "buckets": [int(b or 0) for b in buckets]}
    return found


def throughput(session: Session) -> dict[str, float]:
    """Totals over succeeded work: bytes merges read and wrote and their seconds of merging
    (each job's last progress), and preview images and their seconds of rendering."""
    merged = session.execute(select(
        func.coalesce(func.sum(Job.progress["bytes_read"].as_float()), 0.0),
        func.coalesce(func.sum(Job.progress["elapsed"].as_float()), 0.0),
        func.coalesce(func.sum(Job.output_size), 0),
    ).where(Job.status == "succeeded")).one()
    rendered = session.execute(select(
        func.coalesce(func.sum(Preview.progress["images_done"].as_float()), 0.0),
        func.coalesce(func.sum(Preview.result["seconds"].as_float()), 0.0),
    ).where(Preview.status == "succeeded")).one()
    return {"merge_read_bytes": float(merged[0]), "merge_seconds": float(merged[1]),
            "merge_written_bytes": float(merged[2]), "preview_images": float(rendered[0]),
            "preview_seconds": float(rendered[1])}


def _seconds_between(session: Session, start, end):
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value is not None else None
