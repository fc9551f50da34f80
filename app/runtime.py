"""What a running process holds: settings, the database engine, sessions and the Celery app.

Built once per process by whoever starts (the API factory, the worker), never at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from .db import make_engine, make_sessionmaker
from .dispatch import send_after_commit
from .settings import Settings


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]

    @cached_property
    def celery(self) -> Celery:
        from app.queue import make_celery

        return make_celery(self.settings)

    def send(self, task: str, args: tuple) -> None:
        self.celery.send_task(task, args=list(args))

    def close(self) -> None:
        self.engine.dispose()


def make_runtime(settings: Settings) -> Runtime:
    settings.prepare_dirs()
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size)
    runtime = Runtime(settings, engine, make_sessionmaker(engine))
    send_after_commit(runtime.sessions, runtime.send)
    return runtime
