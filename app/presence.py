"""Worker presence: each `sdmerge worker` rewrites `<data dir>/workers/<name>.json` every few
seconds, from a thread of its own, so it beats while a merge holds the solo pool (a Celery ping
would wait for the merge). The data dir is the volume every host shares, so any API process
lists every worker; the file also serves the container's health check (`sdmerge worker --check`).
A worker stopped cleanly removes its file; one killed leaves it stale, until a reader on its host
sees its process gone (or, on another host, a day later).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from app.settings import Settings

BEAT_SECONDS = 5.0
ALIVE_SECONDS = 6 * BEAT_SECONDS  # a worker not heard of for this long is reported stale
FORGET_SECONDS = 24 * 3600  # a stale file this old is removed by the next reader
# What this process runs now, for its presence file: {"kind", "id"} or empty (set by the lease runner
# through `now_running`, which also wakes the beat, so the file says so at once, not up to 5 s later).
running: dict[str, Any] = {}
_changed = threading.Event()


def now_running(kind: str | None = None, row_id: int | None = None) -> None:
    """This process starts (or, without arguments, ends) a run: its next beat is now."""
    running.clear()
    if kind is not None:
        running.update(kind=kind, id=row_id)
    _changed.set()


def workers_dir(settings: Settings) -> Path:
    return settings.data_dir / "workers"


def worker_name() -> str:
    return f"sdmerge-{os.getpid()}@{socket.gethostname()}"


class Presence:
    """Beats for one worker process until stopped (then its file is removed)."""

    def __init__(self, settings: Settings, name: str, queues: list[str], device: str) -> None:
        self.path = workers_dir(settings) / f"{name}.json"
        self.info = {"name": name, "hostname": socket.gethostname(), "pid": os.getpid(), "queues": queues,
                     "device": device, "started_at": time.time()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)

    def start(self) -> Presence:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        _changed.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)

    def beat(self) -> None:
        entry = {**self.info, "beat_at": time.time(), "running": dict(running) or None}
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(entry))
        os.replace(staging, self.path)  # a reader never sees half a file

    def _run(self) -> None:
        while not self._stop.is_set():
            _changed.wait(BEAT_SECONDS)
            _changed.clear()
            if self._stop.is_set():
                break
            with contextlib.suppress(OSError):  # a full or briefly unreachable volume: beat next time
                self.beat()


def read_workers(settings: Settings, now: float | None = None) -> list[dict]:
    """Every worker heard of in the last day, each with `age_seconds` and `alive`, by name."""
    now = time.time() if now is None else now
    found = []
    folder = workers_dir(settings)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            entry = json.loads(path.read_text())
            age = now - float(entry["beat_at"])
        except (OSError, ValueError, KeyError, TypeError):  # removed or replaced meanwhile
            continue
        if age > FORGET_SECONDS or (age > ALIVE_SECONDS and _dead_here(entry)):
            path.unlink(missing_ok=True)  # long gone, or a killed worker of this host
            continue
        found.append({**entry, "age_seconds": round(max(age, 0.0), 3), "alive": age < ALIVE_SECONDS})
    return found


def _dead_here(entry: dict) -> bool:
    """A worker of this host (same hostname, so same process namespace) whose process is gone."""
    return entry.get("hostname") == socket.gethostname() and not Path(f"/proc/{entry.get('pid')}").exists() \
        and Path("/proc/self").exists()


def check_local(settings: Settings) -> str | None:
    """For a container's health check: None if a worker of this host beat recently and its
    process lives, else what is wrong."""
    host = socket.gethostname()
    mine = [w for w in read_workers(settings) if w.get("hostname") == host]
    if not mine:
        return f"no worker of {host} has written to {workers_dir(settings)}"
    if not any(w["alive"] and Path(f"/proc/{w['pid']}").exists() for w in mine):
        return f"the workers of {host} stopped beating ({', '.join(w['name'] for w in mine)})"
    return None
