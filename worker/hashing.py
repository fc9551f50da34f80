"""Hashing and inspecting a registered model: the `hashing` -> `ready` | `failed` step."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.models import Model
from merge_engine.errors import SdmergeError
from merge_engine.inspect import inspect_checkpoint

log = logging.getLogger(__name__)


def hash_model(sessions: sessionmaker[Session], model_id: int) -> None:
    """Once per (path, size, mtime): a model already `ready` for its current file is left alone."""
    with sessions() as session:
        model = session.get(Model, model_id)
        if model is None or model.status == "ready":
            return
        path, stamp = Path(model.path), (model.size, model.mtime_ns)
    facts: dict = {}
    try:
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) != stamp:
            raise SdmergeError("the file changed after it was registered; register it again",
                               model=path.name)
        report = inspect_checkpoint(path, hashes=True)
        hashes = report["hashes"]
        facts = dict(status="ready", error=None, architecture=report["architecture"],
                     components=report["components"], header_metadata=report["metadata"],
                     sha256=hashes["sha256"], autov3=hashes["autov3"], legacy_hash=hashes["legacy"])
    except (SdmergeError, OSError) as exc:
        facts = dict(status="failed", error=str(exc))
    with sessions.begin() as session:
        model = session.get(Model, model_id, with_for_update=True)
        # Re-registration of a changed file resets the stamp; then this result is stale.
        if model is not None and (model.size, model.mtime_ns) == stamp and model.status == "hashing":
            for name, value in facts.items():
                setattr(model, name, value)
    log.info("model %s: %s", model_id, facts.get("status"))
