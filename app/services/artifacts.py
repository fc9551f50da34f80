"""Artifacts: merge outputs stored once under their sha256 in the data dir."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import Artifact, Job, Model
from app.services.files import artifact_path
from app.settings import Settings


def get_artifact(session: Session, artifact_id: int) -> Artifact:
    artifact = session.get(Artifact, artifact_id)
    if artifact is None:
        raise NotFound("no such artifact", details={"id": artifact_id})
    return artifact


def artifact_file(settings: Settings, artifact: Artifact) -> Path:
    path = artifact_path(settings, artifact.sha256)
    if not path.is_file():
        raise NotFound("the artifact's file is missing from the store", details={"id": artifact.id})
    return path


def delete_artifact(session: Session, settings: Settings, artifact_id: int) -> None:
    """Remove an artifact no job needs. The jobs that made it stay `succeeded` without a file,
    and stop deduplicating, so submitting their recipe again merges again."""
    artifact = get_artifact(session, artifact_id)
    path = artifact_path(settings, artifact.sha256)
    if session.scalar(select(Model.id).where(Model.path == str(path.resolve()))) is not None:
        raise Conflict("the artifact is registered as a model; delete that model first",
                       details={"id": artifact_id})
    session.execute(update(Job).where(Job.artifact_id == artifact.id)
                    .values(artifact_id=None, live_recipe_hash=None))
    session.delete(artifact)
    session.flush()
    path.unlink(missing_ok=True)
