"""`sdmerge worker`: migrate, clean leftovers, start the reaper, then consume tasks."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from app.queue import QUEUES


def run_worker(queues: Sequence[str] = QUEUES, loglevel: str = "INFO") -> None:
    from app.migrate import upgrade
    from worker import tasks  # registers the tasks with the app below
    from worker.reaper import clean_tmp, reap, start_reaper

    runtime = tasks.worker_runtime()
    upgrade(runtime.engine)
    clean_tmp(runtime)
    reap(runtime)
    start_reaper(runtime)
    argv = ["worker", "-Q", ",".join(queues), "--loglevel", loglevel, "--pool", "solo",
            "--concurrency", "1", "--without-mingle", "--without-gossip",
            "--hostname", f"sdmerge-{os.getpid()}@{socket.gethostname()}"]
    runtime.celery.worker_main(argv)

