"""Database engines and sessions, made on demand from settings (never at import time)."""

from __future__ import annotations

import weakref

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, QueuePool

# Starlette runs sync routes on a pool of 40 threads. If fewer connections than threads can be
# checked out, threads blocked on the pool can starve the requests that hold connections of the
# thread they need to finish (a deadlock until the pool times out), so the pool may grow to 40.
ROUTE_THREADS = 40


def normalize_url(url: str) -> str:
    """Plain `postgresql://` means psycopg 3 here, the driver the service depends on."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        # A SQLite connection costs a file open; without a pool there is nothing to exhaust.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, poolclass=NullPool)
        _sqlite_immediate_transactions(engine)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=max(0, ROUTE_THREADS - pool_size),
                         pool_pre_ping=True)


def _sqlite_immediate_transactions(engine: Engine) -> None:
    """API and worker processes write one SQLite file; a deferred transaction that reads and then
    writes fails at once with "database is locked" instead of waiting, so every transaction
    takes the write lock up front (BEGIN IMMEDIATE) and waits on busy_timeout."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


_readers: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def sqlite_reader(engine: Engine) -> Engine | None:
    """Read-only connections to the SQLite file of `engine`, kept open, for hot reads on the event
    loop (`Db.read`); None unless `engine` is on a SQLite file. Each transaction is a plain
    deferred BEGIN, a WAL snapshot that neither takes nor waits for the write lock (every
    BEGIN IMMEDIATE of `engine` does, sleeping in SQLite's busy handler while another holds it),
    and `busy_timeout` is 0, so a read that does find the database locked (an exclusive lock, a
    recovery) fails at once instead of sleeping on the loop; the caller then reads in a thread on
    `engine`. Kept open, a connection also skips the file open, the pragmas and the schema parse
    that `engine`'s NullPool pays on every checkout (~0.3 ms). One per engine, closed with it."""
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return None
    reader = _readers.get(engine)
    if reader is None:
        reader = create_engine(engine.url, connect_args={"check_same_thread": False, "timeout": 0},
                               poolclass=QueuePool, pool_size=2, max_overflow=-1)

        @event.listens_for(reader, "connect")
        def _connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA query_only=ON")
            cursor.close()

        @event.listens_for(reader, "begin")
        def _begin(connection) -> None:
            connection.exec_driver_sql("BEGIN")

        _readers[engine] = reader
        weakref.finalize(engine, reader.dispose)
    return reader


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
