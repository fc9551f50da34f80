"""Hashing and inspecting a registered model: the `hashing` -> `ready` | `failed` step.

Every way this can go wrong ends the model `failed` with the reason: a bad or hostile file, one
that changes while it is read, and anything unforeseen. A model is never left `hashing` by an
error (a killed worker's model is re-sent by the reaper).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.dispatch import enqueue
from app.models import Model, utcnow
from app.queue import HASH_TASK
from merge_engine.errors import InputChangedError, SdmergeError
from merge_engine.inspect import inspect_version

log = logging.getLogger(__name__)
MAX_STORED_METADATA = 1 << 20  # characters of header metadata kept in the registry, in all
MAX_STORED_VALUE = 64 << 10  # a longer value is stored as a note of its length


def hash_model(sessions: sessionmaker[Session], model_id: int) -> None:
    """Once per registration: a model already `ready` for its current file is left alone."""
    with sessions() as session:
        model = session.get(Model, model_id)
        if model is None or model.status == "ready":
            return
        path, stamp = Path(model.path), (model.size, model.mtime_ns)
    try:
        report, version = inspect_version(path, hashes=True)
        hashes = report["hashes"]
        # The row describes the version that was hashed, whatever was registered.
        facts = dict(status="ready", error=None, architecture=report["architecture"],
                     components=report["components"], header_metadata=stored_metadata(report["metadata"]),
                     sha256=hashes["sha256"], autov3=hashes["autov3"], legacy_hash=hashes["legacy"],
                     crc32=hashes["crc32"], blake3=hashes["blake3"], lineage=report["lineage"],
                     size=version.size, mtime_ns=version.mtime_ns, inode=version.inode,
                     ctime_ns=version.ctime_ns)
    except (SdmergeError, OSError) as exc:
        facts = dict(status="failed", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug must not leave the model hashing forever
        log.exception("model %s: hashing failed unexpectedly", model_id)
        facts = dict(status="failed", error=f"internal error while hashing: {type(exc).__name__}: {exc}")
    try:
        _record(sessions, model_id, stamp, facts)
    except Exception as exc:  # noqa: BLE001 - e.g. facts the database refuses: record the failure
        log.exception("model %s: could not record the hashing result", model_id)
        _record(sessions, model_id, stamp, dict(status="failed", error=f"could not record the result: {exc}"))
    log.info("model %s: %s", model_id, facts.get("status"))


def _record(sessions: sessionmaker[Session], model_id: int, stamp: tuple[int, int], facts: dict) -> None:
    with sessions.begin() as session:
        model = session.get(Model, model_id, with_for_update=True)
        # Re-registration of a changed file resets the stamp; then this result is stale.
        if model is not None and (model.size, model.mtime_ns) == stamp and model.status == "hashing":
            for name, value in facts.items():
                setattr(model, name, value)


def stored_metadata(metadata: dict) -> dict:
    """What the registry keeps of a header's metadata: everything, unless a value is huge."""
    kept, total = {}, 0
    for key, value in metadata.items():
        text = value if isinstance(value, str) else None
        size = len(text) if text is not None else len(str(value))
        if size > MAX_STORED_VALUE or total + size > MAX_STORED_METADATA:
            kept[key] = f"<{size} characters, not stored>"
            continue
        kept[key] = value
        total += size
    return kept


@contextmanager
def rehash_if_changed(sessions: sessionmaker[Session]) -> Iterator[None]:
    """Work that reads registered files: if one turns out changed since it was hashed, the work
    fails (the error propagates) and the file's models are hashed again."""
    try:
        yield
    except InputChangedError as exc:
        if path := exc.details.get("path"):
            rehashing = mark_changed(sessions, path)
            if rehashing:
                exc.details["rehashing_models"] = rehashing
                exc.message += "; it is being hashed again: resubmit once it is ready"
        raise


def mark_changed(sessions: sessionmaker[Session], path: str) -> list[int]:
    """A merge found this file changed since it was hashed: every ready model at that path goes
    back to `hashing` (its hashes no longer describe the file) and is hashed again."""
    marked = []
    with sessions.begin() as session:
        for model in session.scalars(select(Model).where(Model.path == path, Model.status == "ready")
                                     .with_for_update()):
            stat = Path(path).stat() if Path(path).exists() else None
            model.status, model.error, model.dispatched_at = "hashing", None, utcnow()
            model.forget_hashes()
            if stat is not None:
                model.size, model.mtime_ns = stat.st_size, stat.st_mtime_ns
            enqueue(session, HASH_TASK, model.id)
            marked.append(model.id)
    return marked
