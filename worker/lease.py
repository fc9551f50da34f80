"""Leased work, whatever the table: claim, heartbeat, run, finish. Merge jobs, analyses and
previews all run through this code, parametrised by their ORM class (`app.models.Leased`).

A row is claimed by an atomic UPDATE that only succeeds for a queued row or a running one whose
lease has lapsed; the heartbeat renews the lease, publishes progress and reads the cancel flag;
the outcome is recorded only while the lease is still ours. So a message delivered twice, a
worker killed mid-run, or a reaper re-dispatch never records two outcomes for one row.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, update
from sqlalchemy.orm import Session

from app import presence
from app.logs import working_on
from app.models import Leased, utcnow
from app.runtime import Runtime
from merge_engine.errors import MergeCancelled, SdmergeError
from merge_engine.passes import Progress

log = logging.getLogger(__name__)


def new_owner() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class Outcome:
    """What a run ends in. `values` are further columns to set; `prepare` runs in the finishing
    transaction before the guarded UPDATE and returns more of them (e.g. an artifact row's id);
    `publish` runs after that UPDATE matched, before the commit (e.g. renaming results into
    place), so only the lease holder ever publishes; `cleanup` runs last in any case."""

    status: str
    error: dict | None = None
    values: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[Session], dict[str, Any]] | None = None
    publish: Callable[[], None] | None = None
    cleanup: Callable[[], None] | None = None  # afterwards, whatever happened (staging files)


Work = Callable[["Heartbeat"], Outcome]


def run_leased(runtime: Runtime, table: type[Leased], row_id: int, work: Work,
               describe: Callable[[Any], dict] | None = None, *, owner: str | None = None) -> str | None:
    """Claim the row and run `work` under its lease (or under `owner`'s, claimed already);
    returns the final status, or None if the row was not claimable (finished, cancelled, leased
    elsewhere) or the lease was lost."""
    if owner is None:
        owner = new_owner()
        with working_on(kind=table.kind, job_id=row_id):  # run_claimed names the work from here on
            if not claim(runtime, table, row_id, owner):
                log.info("%s %s: not claimable (finished, cancelled or leased elsewhere)", table.kind, row_id)
                return None
            log.info("%s %s: claimed by %s (pid %s)", table.kind, row_id, owner, os.getpid())
    return run_claimed(runtime, table, row_id, owner, work, describe)


def run_claimed(runtime: Runtime, table: type[Leased], row_id: int, owner: str, work: Work,
                describe: Callable[[Any], dict] | None = None) -> str | None:
    """Run `work` for a row whose lease `owner` holds, and record the outcome while it still does.
    Domain errors fail the row with their message; a cancel ends it `cancelled`."""
    presence.now_running(table.kind, row_id)
    try:
        with working_on(kind=table.kind, job_id=row_id):
            return _run_claimed(runtime, table, row_id, owner, work, describe)
    finally:
        presence.now_running()


def _run_claimed(runtime: Runtime, table: type[Leased], row_id: int, owner: str, work: Work,
                 describe: Callable[[Any], dict] | None) -> str | None:
    with Heartbeat(runtime, table, row_id, owner, describe) as heartbeat:
        try:
            outcome = work(heartbeat)
        except MergeCancelled:
            outcome = Outcome("cancelled")
        except SdmergeError as exc:
            outcome = Outcome("failed", exc.to_dict())
        except Exception as exc:
            log.exception("%s %s failed unexpectedly", table.kind, row_id)
            outcome = Outcome("failed", {"code": "internal_error", "message": repr(exc), "details": {}})
        progress = heartbeat.snapshot()
    try:
        if heartbeat.lost:
            log.warning("%s %s: lease lost to another worker; this attempt's outcome is dropped", table.kind, row_id)
            return None
        return finish(runtime, table, row_id, owner, outcome, progress)
    finally:
        if outcome.cleanup is not None:
            outcome.cleanup()


def claim(runtime: Runtime, table: type[Leased], row_id: int, owner: str) -> bool:
    now = utcnow()
    with runtime.sessions.begin() as session:
        result = session.execute(
            update(table)
            .where(table.id == row_id, table.cancel_requested.is_(False),
                   or_(table.status == "queued", and_(table.status == "running", table.lease_expires_at < now)))
            .values(status="running", lease_owner=owner, attempts=table.attempts + 1,
                    lease_expires_at=now + timedelta(seconds=runtime.settings.job_lease_seconds),
                    started_at=func.coalesce(table.started_at, now), error=None)
        )
        return result.rowcount == 1


def finish(runtime: Runtime, table: type[Leased], row_id: int, owner: str, outcome: Outcome,
           progress: dict | None) -> str | None:
    """Record the outcome if the lease is still `owner`'s; None (and nothing published) if not.
    A publish that fails turns the outcome into a failure rather than losing the row."""
    try:
        return _finish(runtime, table, row_id, owner, outcome, progress)
    except OSError as exc:
        if outcome.publish is None:
            raise
        log.exception("%s %s: could not publish the result", table.kind, row_id)
        error = {"code": "insufficient_storage", "message": f"could not store the result: {exc}", "details": {}}
        return _finish(runtime, table, row_id, owner, Outcome("failed", error), progress)


def _finish(runtime: Runtime, table: type[Leased], row_id: int, owner: str, outcome: Outcome,
            progress: dict | None) -> str | None:
    with runtime.sessions.begin() as session:
        values = dict(status=outcome.status, finished_at=utcnow(), lease_owner=None, lease_expires_at=None,
                      error=outcome.error, **table.end_values(outcome.status), **outcome.values)
        if progress is not None:
            values["progress"] = progress
        if outcome.prepare is not None:
            values.update(outcome.prepare(session))
        result = session.execute(
            update(table).where(table.id == row_id, table.lease_owner == owner, table.status == "running")
            .values(**values)
        )
        if result.rowcount != 1:
            session.rollback()
            return None
        if outcome.publish is not None:
            outcome.publish()
    log.info("%s %s: %s", table.kind, row_id, outcome.status)
    return outcome.status


def stream_progress(progress: Progress) -> dict:
    """A streaming pass's progress (merges, analyses) as the API shows it."""
    rate = progress.bytes_read / progress.elapsed if progress.elapsed > 0 else None
    return {**asdict(progress), "rate_bytes_per_second": rate, "eta_seconds": progress.eta}


class Heartbeat:
    """Renews the lease, publishes the latest progress and picks up the cancel flag, on a
    timer: the engine's callbacks only touch memory, so no tensor waits on the database."""

    def __init__(self, runtime: Runtime, table: type[Leased], row_id: int, owner: str,
                 describe: Callable[[Any], dict] | None = None) -> None:
        self.runtime, self.table, self.row_id, self.owner = runtime, table, row_id, owner
        self.describe = describe or stream_progress
        self.interval = min(1.0, runtime.settings.job_lease_seconds / 4)
        self.lost = False
        self._progress: Any = None
        self._cancel = threading.Event()
        self._stop = threading.Event()
        # In the caller's context, so what the heartbeat logs names the work too (app/logs.py).
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=f"lease-{table.kind}-{row_id}",
                                        daemon=True)

    def __enter__(self) -> Heartbeat:
        self._beat_safely()  # at once: a cancel that came in since the claim stops the work early
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def record(self, progress: Any) -> None:
        self._progress = progress

    def should_stop(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise MergeCancelled if the row was cancelled (or the lease lost): for the steps
        between engine calls, which have no `should_cancel` of their own."""
        if self.should_stop():
            raise MergeCancelled(f"the {self.table.kind} was cancelled")

    def snapshot(self) -> dict | None:
        return None if self._progress is None else self.describe(self._progress)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat_safely()

    def _beat_safely(self) -> None:
        try:
            self.beat()
        except Exception:  # a database hiccup: the lease has slack for a few missed beats
            log.exception("%s %s: heartbeat failed", self.table.kind, self.row_id)

    def beat(self) -> None:
        table = self.table
        values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=self.runtime.settings.job_lease_seconds)}
        if (progress := self.snapshot()) is not None:
            values["progress"] = progress
        with self.runtime.sessions.begin() as session:
            row = session.execute(
                update(table).where(table.id == self.row_id, table.lease_owner == self.owner, table.status == "running")
                .values(**values).returning(table.cancel_requested)
            ).first()
        if row is None:
            self.lost = True
            self._cancel.set()
        elif row.cancel_requested:
            self._cancel.set()


class Vouch:
    """For work without a lease (hashing a model): while it runs, the row's `dispatched_at` is
    kept fresh, so the reaper, which re-sends what waited a lease since it was sent, leaves a
    long hash alone; once the worker dies, the row is re-sent a lease later."""

    def __init__(self, runtime: Runtime, table: Any, row_id: int, status: str) -> None:
        self.runtime, self.table, self.row_id, self.status = runtime, table, row_id, status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vouch-{table.__tablename__}-{row_id}", daemon=True)

    def __enter__(self) -> Vouch:
        self._vouch()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.runtime.settings.job_lease_seconds / 4)):
            self._vouch()

    def _vouch(self) -> None:
        table = self.table
        try:
            with self.runtime.sessions.begin() as session:
                session.execute(update(table).where(table.id == self.row_id, table.status == self.status)
                                .values(dispatched_at=utcnow()))
        except Exception:  # a database hiccup: a lease has slack for a few missed beats
            log.exception("%s %s: vouching failed", table.__tablename__, self.row_id)
