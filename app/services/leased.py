"""What every kind of leased work (merge jobs, analyses, previews) shares in the API: reading a
row, listing newest first, cancelling. Each takes the ORM class of the table."""

from __future__ import annotations

import shutil
from typing import TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import Leased, utcnow
from app.services.files import result_dir
from app.settings import Settings

T = TypeVar("T", bound=Leased)
WHAT = {"job": "merge job", "analysis": "analysis", "preview": "preview"}


def get_row(session: Session, table: type[T], row_id: int) -> T:
    row = session.get(table, row_id)
    if row is None:
        raise NotFound(f"no such {WHAT[table.kind]}", details={"id": row_id})
    return row


def list_rows(session: Session, table: type[T], *, status: str | None = None, before: int | None = None,
              limit: int = 50) -> list[T]:
    """Newest first; `before` is the cursor (the last id of the previous page)."""
    query = select(table).order_by(table.id.desc()).limit(limit)
    if status:
        query = query.where(table.status == status)
    if before is not None:
        query = query.where(table.id < before)
    return list(session.scalars(query))


def cancel(session: Session, table: type[T], row_id: int) -> T:
    """A queued row is cancelled at once; a running one is flagged and its worker stops within
    about a second (its next heartbeat) and removes its partial files. Finished work cannot be
    cancelled (409). Each step is one guarded UPDATE, so a worker claiming the row at the same
    moment cannot slip by."""
    queued = session.execute(
        update(table).where(table.id == row_id, table.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=utcnow(), **table.end_values("cancelled")))
    changed = queued.rowcount or session.execute(
        update(table).where(table.id == row_id, table.status == "running").values(cancel_requested=True)).rowcount
    row = get_row(session, table, row_id)
    session.refresh(row)
    if not changed:
        raise Conflict(f"{WHAT[table.kind]} is already {row.status}", details={"id": row_id, "status": row.status})
    return row


def delete(session: Session, settings: Settings, table: type[T], row_id: int) -> T | None:
    """Queued or running: cancel it (the row stays, `cancelled`) and return it. Finished: forget
    the row and remove its published results; None then."""
    row = get_row(session, table, row_id)
    if row.status in ("queued", "running"):
        return cancel(session, table, row_id)
    session.delete(row)
    session.flush()
    shutil.rmtree(result_dir(settings, table.kind, row_id), ignore_errors=True)
    return None
