"""The reaper: leased work (merge jobs, analyses, previews) whose lease lapsed (crashed worker)
or whose message was lost is sent again; so are hashing models.

It runs in every worker. A row still queued (or a model still hashing) a lease after it was
sent is sent again only if no message for it is left in the broker (`app.broker.waiting`): a
job waiting behind a long merge keeps its one message, while one whose message was lost (a
broker restarted without persistence, an API killed between its commit and its send) runs
within about a lease. A worker hashing a model vouches for it meanwhile (worker/tasks.py), as
a lease holder does for its row. Each re-dispatch is an UPDATE guarded by the state it saw, so
several reapers at once send a row once; and a duplicate message is harmless since claims are
atomic. A broker that cannot be read is most likely down (a message sent now would be lost
too): then nothing is re-sent that pass, unless it has waited `BLIND_RESEND_AFTER_LEASES`.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.broker import recover, waiting
from app.dispatch import enqueue
from app.models import Analysis, Job, Leased, MergeShard, Model, Preview, utcnow
from app.queue import ANALYSIS_TASK, HASH_TASK, MERGE_TASK, PREVIEW_TASK, QUEUES, SHARD_TASK
from app.runtime import Runtime
from app.services.files import clean_partials, shared_partial_token

log = logging.getLogger(__name__)
# A queued row or hashing model not claimed this many lease lengths after it was sent is looked
# for in the broker, and sent again if its message is gone.
RESEND_AFTER_LEASES = 1
# ... and while the broker cannot be looked into, after this many, message or not.
BLIND_RESEND_AFTER_LEASES = 10
LEASED_TASKS: dict[type[Leased], str] = {Job: MERGE_TASK, Analysis: ANALYSIS_TASK, Preview: PREVIEW_TASK,
                                          MergeShard: SHARD_TASK}


def reap(runtime: Runtime) -> dict[str, list[int]]:
    """One pass. The report's keys are `cancelled`, `requeued`, `resent` for merge jobs, the
    same prefixed by `analysis_`, `preview_` and `shard_` for those tables (a shard of a sharded
    merge is re-run like a job), and `rehash` for models."""
    now = utcnow()
    waiting = _waiting(runtime)
    leases = RESEND_AFTER_LEASES if waiting is not None else BLIND_RESEND_AFTER_LEASES
    resend_before = now - timedelta(seconds=runtime.settings.job_lease_seconds * leases)
    waiting = waiting or set()
    report: dict[str, list[int]] = {}
    with runtime.sessions.begin() as session:
        for table, task in LEASED_TASKS.items():
            prefix = "" if table is Job else f"{table.kind}_"
            for name, ids in _reap_table(session, table, task, now, resend_before, waiting).items():
                report[prefix + name] = ids
        stale = and_(Model.status == "hashing", _sent_before(Model, resend_before))
        lost = [i for i in session.scalars(select(Model.id).where(stale)) if (HASH_TASK, i) not in waiting]
        report["rehash"] = list(session.scalars(
            update(Model).where(Model.id.in_(lost), stale).values(dispatched_at=now).returning(Model.id))) if lost else []
        for model_id in report["rehash"]:
            enqueue(session, HASH_TASK, model_id)
    if any(report.values()):
        log.warning("reaper: %s", {k: v for k, v in report.items() if v})
    if any(ids for name, ids in report.items() if name.endswith(("requeued", "cancelled"))):
        clean_tmp(runtime)  # the partial files of the attempts whose lease lapsed
    return report


def _waiting(runtime: Runtime) -> set[tuple[str, int]] | None:
    """Every (task, id) with a message in the broker (after putting back what killed consumers
    left claimed); None if the broker cannot be read."""
    lease = runtime.settings.job_lease_seconds
    try:
        with runtime.celery.connection_for_read() as connection:
            recover(connection, older_than=lease)
            return set().union(*(waiting(connection, queue, taken_within=lease) for queue in QUEUES))
    except Exception as exc:  # noqa: BLE001 - most likely down: say so in one line, every pass
        log.warning("reaper: cannot look into the broker's queues (%s: %s)", type(exc).__name__, exc)
        return None


def _sent_before(table, before: datetime):
    return or_(table.dispatched_at.is_(None), table.dispatched_at < before)


def _reap_table(session: Session, table: type[Leased], task: str, now: datetime,
                resend_before: datetime, waiting: set[tuple[str, int]]) -> dict[str, list[int]]:
    expired = and_(table.status == "running", table.lease_expires_at < now)
    found = {}
    found["cancelled"] = list(session.scalars(
        update(table).where(expired, table.cancel_requested.is_(True))
        .values(status="cancelled", finished_at=now, lease_owner=None, lease_expires_at=None,
                **table.end_values("cancelled")).returning(table.id)))
    found["requeued"] = list(session.scalars(
        update(table).where(expired).values(status="queued", lease_owner=None, lease_expires_at=None,
                                            dispatched_at=now).returning(table.id)))
    # The UPDATE repeats the SELECT's condition: a reaper that re-sent the row meanwhile wins.
    stale = and_(table.status == "queued", _sent_before(table, resend_before))
    lost = [i for i in session.scalars(select(table.id).where(stale)) if (task, i) not in waiting]
    found["resent"] = list(session.scalars(
        update(table).where(table.id.in_(lost), stale).values(dispatched_at=now)
        .returning(table.id))) if lost else []
    for row_id in found["requeued"] + found["resent"]:
        enqueue(session, task, row_id)
    return found


def live_leases(runtime: Runtime) -> set[tuple[str, int, str]]:
    """(kind, id, owner) of every lease still running, whatever the table."""
    leases = set()
    with runtime.sessions() as session:
        for table in LEASED_TASKS:
            rows = session.execute(select(table.id, table.lease_owner).where(
                table.status == "running", table.lease_expires_at >= utcnow()))
            leases |= {(table.kind, row_id, owner) for row_id, owner in rows}
        # A sharded job's shared file lives as long as the job, whoever holds its lease.
        rows = session.execute(select(Job.id, Job.recipe_hash).where(
            Job.status.in_(("queued", "running")), Job.shards.is_not(None)))
        leases |= {("shards", job_id, shared_partial_token(recipe_hash)) for job_id, recipe_hash in rows}
    return leases


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
