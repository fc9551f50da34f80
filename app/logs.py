"""Logging for `sdmerge serve` and `sdmerge worker`: plain text or one JSON object a line
(SDMERGE_LOG_FORMAT), and the work being run on every line logged while it runs.

The lease runner (worker/lease.py) and the Celery task set `current_work` for the length of a
run; `WorkFilter` copies it onto each record, so `grep '"job_id": 12'` finds everything a job
logged, whichever module logged it. One dictConfig serves both processes and uvicorn's own
loggers (uvicorn applies it again in each of its worker processes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.config
import traceback
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
# What runs now in this context: {"kind": "job", "job_id": 12, "task_id": "..."}; set per run.
current_work: ContextVar[dict[str, Any] | None] = ContextVar("sdmerge_current_work", default=None)
WORK_FIELDS = ("kind", "job_id", "task_id")
# The attributes every LogRecord has: anything else on a record came from `extra=` and is kept.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "work", "color_message"}


@contextlib.contextmanager
def working_on(**fields: Any) -> Iterator[None]:
    """Log lines in this block (and in threads started with its context) carry `fields`, added
    to whatever outer block set (the task id outside, the row inside)."""
    token = current_work.set({**(current_work.get() or {}), **fields})
    try:
        yield
    finally:
        current_work.reset(token)


class WorkFilter(logging.Filter):
    """Puts the current work's fields on the record, and `work`, a short text prefix."""

    def filter(self, record: logging.LogRecord) -> bool:
        work = current_work.get() or {}
        for name in WORK_FIELDS:
            if name in work and not hasattr(record, name):
                setattr(record, name, work[name])
        record.work = f"[{work['kind']} {work['job_id']}] " if "job_id" in work else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the work fields,
    any `extra=` fields, and the traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _RECORD_ATTRS)
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, default=str)


def logging_config(log_format: str, level: str = "INFO", access_log: bool = True) -> dict:
    """The dictConfig of a service process: one stderr handler on the root logger, uvicorn's and
    Celery's loggers propagating to it."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r} (SDMERGE_LOG_FORMAT: {' or '.join(LOG_FORMATS)})")
    formatter = ({"()": "app.logs.JsonFormatter"} if log_format == "json" else
                 {"format": "%(asctime)s %(levelname)s %(name)s: %(work)s%(message)s"})
    propagate = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"work": {"()": "app.logs.WorkFilter"}},
        "formatters": {"default": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "default", "filters": ["work"]}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {"uvicorn": {**propagate, "level": "INFO"}, "uvicorn.error": propagate,
                    "uvicorn.access": {**propagate, "level": "INFO" if access_log else "WARNING"},
                    "celery": propagate},
    }


def configure_logging(log_format: str, level: str = "INFO", access_log: bool = True) -> dict:
    """Applies `logging_config` to this process and returns it (uvicorn applies it again)."""
    config = logging_config(log_format, level, access_log)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)  # warnings become log lines too (logger `py.warnings`)
    return config
