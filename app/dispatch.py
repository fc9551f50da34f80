"""Sending tasks by name, only after the commit that created their rows.

Services call `enqueue(session, task, id)`; the message leaves when the session commits and is
dropped when it rolls back, so a worker never sees an id that is not in the database yet. A
message lost after the commit (broker down, process killed) is re-sent by the reaper.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
Send = Callable[[str, tuple], None]


def enqueue(session: Session, task: str, *args: object) -> None:
    session.info.setdefault("outbox", []).append((task, args))


def send_after_commit(sessions: sessionmaker[Session], send: Send) -> None:
    @event.listens_for(sessions, "after_commit")
    def _flush_outbox(session: Session) -> None:
        for task, args in session.info.pop("outbox", []):
            try:
                send(task, args)
            except Exception:  # the row is committed; the reaper will send it again
                log.exception("could not send %s%r; the reaper will retry", task, args)

    @event.listens_for(sessions, "after_rollback")
    def _drop_outbox(session: Session) -> None:
        session.info.pop("outbox", None)
