"""`sdmerge worker`: log setup, migrate, clean leftovers, start the reaper and the presence
beat, then consume tasks."""

from __future__ import annotations

from collections.abc import Sequence

from app.queue import QUEUES


def run_worker(queues: Sequence[str] = QUEUES, loglevel: str = "INFO") -> None:
    from celery.signals import setup_logging

    from app.logs import configure_logging
    from app.migrate import upgrade
    from app.presence import Presence, worker_name
    from app.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_format, loglevel)
    # Celery configures logging only when nobody answers this signal: ours is already in place.
    setup_logging.connect(lambda **_: None, weak=False)

    from worker import tasks  # registers the tasks with the app below
    from worker.reaper import clean_tmp, reap, start_reaper

    runtime = tasks.worker_runtime()
    upgrade(runtime.engine)
    clean_tmp(runtime)
    reap(runtime)
    start_reaper(runtime)
    name = worker_name()
    argv = ["worker", "-Q", ",".join(queues), "--loglevel", loglevel, "--pool", "solo",
            "--concurrency", "1", "--without-mingle", "--without-gossip", "--hostname", name]
    if settings.log_format == "json":
        argv.insert(0, "--quiet")  # no banner: every line of the output is a JSON object
    presence = Presence(settings, name, list(queues), settings.merge_device).start()
    try:
        runtime.celery.worker_main(argv)
    finally:
        presence.stop()


def check_worker() -> str | None:
    """`sdmerge worker --check`: None if a worker of this host is alive (app/presence.py)."""
    from app.presence import check_local
    from app.settings import get_settings

    return check_local(get_settings())
