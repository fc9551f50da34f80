"""Request dependencies: the process runtime, its settings, and transactions run off the loop.

Routes are `async` and hand their service call to `Db.run`, which runs it in a worker thread
inside one session and commits before the thread is given back. A connection is therefore only
ever held by a running thread. (With sync routes and a per-request session, a request keeps its
connection while it waits for a thread to serialize its response; under load every thread can
end up waiting for a connection that such a request holds, until the pool times out.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from app.errors import BadRequest
from app.runtime import Runtime
from app.settings import Settings

T = TypeVar("T")


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.runtime.settings


class Db:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def run(self, service: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`service(session, *args, **kwargs)` in one committed transaction, off the event loop."""
        return await run_in_threadpool(self._transaction, service, args, kwargs)

    def _transaction(self, service: Callable[..., T], args: tuple, kwargs: dict) -> T:
        with self.runtime.sessions() as session:
            result = service(session, *args, **kwargs)
            session.commit()  # also ends read-only transactions, returning the connection
            return result


def get_db(request: Request) -> Db:
    return Db(request.app.state.runtime)


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if not cursor.isdigit():
        raise BadRequest("cursor must be the `next` value of a previous page", details={"cursor": cursor})
    return int(cursor)


def next_cursor(items: list, limit: int) -> str | None:
    return str(items[-1].id) if len(items) == limit else None


DbDep = Annotated[Db, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
