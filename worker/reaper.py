"""The reaper: jobs whose lease lapsed (crashed worker) or whose message was lost are sent again.

It runs in every worker. Each re-dispatch is an UPDATE guarded by the state it saw, so several
reapers at once send a job once; and a duplicate message is harmless since claims are atomic.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import and_, or_, select, update

from app.dispatch import enqueue
from app.models import Job, Model, utcnow
from app.runtime import Runtime
from app.services.files import clean_partials
from worker.celery_app import HASH_TASK, MERGE_TASK

log = logging.getLogger(__name__)
# A queued job or hashing model whose message may have been lost is re-sent after this many
# lease lengths; waiting behind other jobs for that long only costs a duplicate no-op message.
RESEND_AFTER_LEASES = 10


def reap(runtime: Runtime) -> dict[str, list[int]]:
    now = utcnow()
    resend_before = now - timedelta(seconds=runtime.settings.job_lease_seconds * RESEND_AFTER_LEASES)
    expired = and_(Job.status == "running", Job.lease_expires_at < now)
    report: dict[str, list[int]] = {"cancelled": [], "requeued": [], "resent": [], "rehash": []}
    with runtime.sessions.begin() as session:
        report["cancelled"] = list(session.scalars(
            update(Job).where(expired, Job.cancel_requested.is_(True))
            .values(status="cancelled", finished_at=now, live_recipe_hash=None, lease_owner=None,
                    lease_expires_at=None).returning(Job.id)))
        report["requeued"] = list(session.scalars(
            update(Job).where(expired).values(status="queued", lease_owner=None, lease_expires_at=None,
                                              dispatched_at=now).returning(Job.id)))
        report["resent"] = list(session.scalars(
            update(Job).where(Job.status == "queued",
                              or_(Job.dispatched_at.is_(None), Job.dispatched_at < resend_before))
            .values(dispatched_at=now).returning(Job.id)))
        for job_id in report["requeued"] + report["resent"]:
            enqueue(session, MERGE_TASK, job_id)
        report["rehash"] = list(session.scalars(
            update(Model).where(Model.status == "hashing",
                                or_(Model.dispatched_at.is_(None), Model.dispatched_at < resend_before))
            .values(dispatched_at=now).returning(Model.id)))
        for model_id in report["rehash"]:
            enqueue(session, HASH_TASK, model_id)
    if any(report.values()):
        log.warning("reaper: %s", {k: v for k, v in report.items() if v})
    if report["requeued"] or report["cancelled"]:
        clean_tmp(runtime)  # the partial files of the attempts whose lease lapsed
    return report


def live_leases(runtime: Runtime) -> set[tuple[int, str]]:
    with runtime.sessions() as session:
        rows = session.execute(select(Job.id, Job.lease_owner).where(
            Job.status == "running", Job.lease_expires_at >= utcnow()))
        return {(job_id, owner) for job_id, owner in rows}


def clean_tmp(runtime: Runtime) -> None:
    removed = clean_partials(runtime.settings, live_leases(runtime))
    if removed:
        log.info("removed %d partial files left by earlier runs", len(removed))


def start_reaper(runtime: Runtime) -> threading.Event:
    """Reap every `reaper_interval` seconds in a daemon thread; set the returned event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(runtime.settings.reaper_interval):
            try:
                reap(runtime)
            except Exception:
                log.exception("reaper pass failed")

    threading.Thread(target=loop, name="reaper", daemon=True).start()
    return stop
