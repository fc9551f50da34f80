"""Request dependencies: the process runtime, its settings, and transactions run off the loop.

Routes are `async` and hand their service call to `Db.run`, which runs it in a worker thread
inside one session and commits before the thread is given back. A connection is therefore only
ever held by a running thread. (With sync routes and a per-request session, a request keeps its
connection while it waits for a thread to serialize its response; under load every thread can
end up waiting for a connection that such a request holds, until the pool times out.)

The one exception is `Db.read`, for a hot read of a few rows (a status poll): on SQLite it runs
on the event loop itself, on a kept-open read-only connection whose WAL snapshot never waits for
a writer (tens of microseconds, less than the hop to a thread and back), and moves to a thread
only if it finds the database locked; on other databases it runs in a thread, on a pooled
connection and without an ORM session, with thread tokens of its own. Requests that plan
recipes (`Db.run_heavy`) run at most one per spare core (cores - 1, at least 1) at a time.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from app.db import sqlite_reader
from app.errors import BadRequest
from app.models import MAX_ROW_ID, as_row_id
from app.runtime import Runtime
from app.settings import Settings

T = TypeVar("T")


# The dependencies are `async def` although they only read attributes: FastAPI runs a plain
# `def` dependency in the thread pool, a hop to a thread and back for every request.
async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.runtime.settings


class _Limiters:
    """Thread budgets, made on the running loop (anyio needs one). Plans are CPU work under the
    GIL: more of them at once than there are spare cores (one is left to the event loop and the
    polls) only slows every thread of the process, so they queue on the loop for `heavy` instead
    of filling the thread pool. Status polls that need a thread get tokens of their own (`reads`),
    so they never wait behind a queue of other requests for one."""

    _per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Limiters] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.heavy = anyio.CapacityLimiter(max(1, min(4, (os.cpu_count() or 1) - 1)))
        self.reads = anyio.CapacityLimiter(16)

    @classmethod
    def get(cls) -> _Limiters:
        loop = asyncio.get_running_loop()  # a limiter belongs to the loop it was made on
        limiters = cls._per_loop.get(loop)
        if limiters is None:
            limiters = cls._per_loop[loop] = cls()
        return limiters


class Db:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def run(self, service: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`service(session, *args, **kwargs)` in one committed transaction, off the event loop."""
        return await run_in_threadpool(self._transaction, service, args, kwargs)

    async def run_heavy(self, service: Callable[..., T], *args: Any) -> T:
        """`run` for requests that plan recipes (CPU-bound): at most one per spare core at a time."""
        return await anyio.to_thread.run_sync(self._transaction, service, args, {}, limiter=_Limiters.get().heavy)

    async def read(self, query: Callable[..., T], *args: Any) -> T:
        """`query(connection, *args)`, which only reads, in one transaction (see the module doc)."""
        engine = self.runtime.engine
        reader = sqlite_reader(engine)
        if reader is not None:
            try:
                return self._read(reader, query, args)
            except OperationalError:  # locked: wait for it in a thread, as any transaction does
                pass
        return await anyio.to_thread.run_sync(self._read, engine, query, args, limiter=_Limiters.get().reads)

    @staticmethod
    def _read(engine: Engine, query: Callable[..., T], args: tuple) -> T:
        with engine.connect() as connection:
            result = query(connection, *args)
            connection.commit()
            return result

    def _transaction(self, service: Callable[..., T], args: tuple, kwargs: dict) -> T:
        with self.runtime.sessions() as session:
            result = service(session, *args, **kwargs)
            session.commit()  # also ends read-only transactions, returning the connection
            return result


async def get_db(request: Request) -> Db:
    return Db(request.app.state.runtime)


RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID, description="a row id")]
WorkStatus = Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
                       Query(description="only rows in this state")]
ModelStatus = Annotated[Literal["hashing", "ready", "failed"] | None, Query(description="only models in this state")]
SearchText = Annotated[str | None, Query(max_length=255, pattern=r"^[^\x00]*$")]  # no NUL: PostgreSQL refuses it


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if (value := as_row_id(cursor)) is None:
        raise BadRequest("cursor must be the `next` value of a previous page", details={"cursor": cursor[:100]})
    return value


def next_cursor(items: list, limit: int) -> str | None:
    return str(items[-1].id) if len(items) == limit else None


DbDep = Annotated[Db, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
