"""Running one merge job under a lease (worker/lease.py): plan, merge, store the artifact.

The artifact row is created in the same transaction that records the outcome, and only while
the lease is still ours; the file itself is content-addressed, so two attempts that both got
this far wrote the same bytes to the same place.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import Artifact, Job, Model
from app.runtime import Runtime
from app.services.files import artifact_path, job_output_path
from merge_engine.errors import InputChangedError, ResolveError
from merge_engine.execute import merge
from merge_engine.lineage import recorded_lineage
from merge_engine.plan import ResolvedModel, plan
from merge_engine.recipe import ModelLeaf, parse_recipe
from worker import lease, shards
from worker.hashing import rehash_if_changed
from worker.lease import Heartbeat, Outcome


def run_merge_job(runtime: Runtime, job_id: int, owner: str | None = None) -> str | None:
    """Run the job if it can be claimed (or under `owner`'s lease, already claimed); returns its
    final status, or None if it was not ours."""
    return lease.run_leased(runtime, Job, job_id, lambda heartbeat: _merge(runtime, job_id, heartbeat),
                            shards.describe, owner=owner)


def _merge(runtime: Runtime, job_id: int, heartbeat: Heartbeat) -> Outcome:
    settings = runtime.settings
    output = job_output_path(settings, job_id, heartbeat.owner)
    options = shards.options_for(runtime)
    recipe, requested = _load_recipe(runtime, job_id)
    try:
        with rehash_if_changed(runtime.sessions):  # this attempt fails; the file's hashes are stale
            planned = plan(recipe, registry_resolver(runtime))
            try:
                if (count := shards.count_for(runtime, planned, requested)) > 1:
                    result = shards.run_sharded(runtime, job_id, heartbeat, planned, count, output)
                else:
                    result = merge(planned, output, options=options, progress=heartbeat.record,
                                   should_cancel=heartbeat.should_stop, tmp_dir=settings.tmp_dir,
                                   compute_sha256=True)
            finally:
                planned.close()
        stored = artifact_path(settings, result.sha256)
        stored.parent.mkdir(parents=True, exist_ok=True)
        os.replace(result.path, stored)  # same bytes if another attempt got here first
    finally:
        output.unlink(missing_ok=True)
    filename = f"{planned.recipe.name or f'merge-{job_id}'}.safetensors"
    lineage = recorded_lineage(result.metadata)  # read once, here: lineage requests only read the row

    def artifact_id(session: Session) -> dict:
        return {"artifact_id": _store_artifact(session, result.sha256, result.size, filename, result.metadata,
                                               lineage)}

    return Outcome("succeeded", prepare=artifact_id)


def _store_artifact(session: Session, sha256: str, size: int, filename: str, metadata: dict,
                    lineage: dict | None) -> int:
    existing = session.scalar(select(Artifact.id).where(Artifact.sha256 == sha256))
    if existing is not None:
        return existing
    try:
        with session.begin_nested():
            artifact = Artifact(sha256=sha256, size=size, filename=filename, header_metadata=metadata,
                                lineage=lineage)
            session.add(artifact)
        return artifact.id
    except IntegrityError:  # identical bytes stored by a concurrent job
        return session.scalar(select(Artifact.id).where(Artifact.sha256 == sha256))


def _load_recipe(runtime: Runtime, job_id: int):
    """The job's recipe and the shard count it asked for (None: from the settings)."""
    with runtime.sessions() as session:
        job = session.get(Job, job_id)
        return parse_recipe(job.recipe), job.shards


def registry_resolver(runtime: Runtime):
    """Canonical recipes name every leaf by sha256; the file must still be the one hashed. A
    merge output (an artifact, e.g. a preview of a finished merge) resolves to its stored file."""

    def resolve(leaf) -> ResolvedModel:
        sha256 = leaf.sha256 if isinstance(leaf, ModelLeaf) else None
        with runtime.sessions() as session:
            models = list(session.scalars(select(Model).where(Model.sha256 == sha256, Model.status == "ready")))
            artifact = session.scalar(select(Artifact).where(Artifact.sha256 == sha256)) if sha256 else None
        changed = None
        for model in models:
            path = Path(model.path)
            try:
                stat = path.stat()
            except OSError:
                continue
            if (stat.st_size, stat.st_mtime_ns) == (model.size, model.mtime_ns):
                # The plan compares the file it opens with every field the hash task recorded.
                return ResolvedModel(path, model.name, model.sha256, model.legacy_hash, model.size,
                                     model.mtime_ns, model.inode, model.ctime_ns)
            changed = changed or model
        if changed is not None and artifact is None:
            raise InputChangedError("the file changed since it was hashed (size or mtime differ)",
                                    model=changed.name, details={"path": changed.path})
        if artifact is not None and (path := artifact_path(runtime.settings, artifact.sha256)).is_file():
            return ResolvedModel(path, artifact.filename, artifact.sha256)
        label = leaf.label() if isinstance(leaf, ModelLeaf) else str(leaf)
        raise ResolveError("the model was removed or changed since the job was submitted", model=label)

    return resolve
