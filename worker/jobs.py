"""Running one merge job under a lease: claim, heartbeat, merge, store, record.

A job is claimed by an atomic UPDATE that only succeeds for a queued job or a running one whose
lease has lapsed; the heartbeat renews the lease, publishes progress and reads the cancel flag;
the outcome is recorded only while the lease is still ours. So a message delivered twice, a
worker killed mid-merge, or a reaper re-dispatch never runs a job into two artifacts.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import Artifact, Job, Model, utcnow
from app.runtime import Runtime
from app.services.files import artifact_path, job_output_path
from merge_engine.errors import MergeCancelled, ResolveError, SdmergeError
from merge_engine.execute import ExecOptions, merge
from merge_engine.passes import Progress
from merge_engine.plan import ResolvedModel, plan
from merge_engine.recipe import ModelLeaf, parse_recipe

log = logging.getLogger(__name__)


def new_owner() -> str:
    return uuid.uuid4().hex[:16]


def run_merge_job(runtime: Runtime, job_id: int) -> str | None:
    """Run the job if it can be claimed; returns its final status, or None if it was not ours."""
    owner = new_owner()
    if not claim(runtime, job_id, owner):
        log.info("job %s: not claimable (finished, cancelled or leased elsewhere)", job_id)
        return None
    log.info("job %s: claimed by %s (pid %s)", job_id, owner, os.getpid())
    return run_claimed(runtime, job_id, owner)


def run_claimed(runtime: Runtime, job_id: int, owner: str) -> str | None:
    """Merge a job whose lease `owner` holds, and record the outcome while the lease is still ours."""
    settings = runtime.settings
    output = job_output_path(settings, job_id, owner)
    with Heartbeat(runtime, job_id, owner) as heartbeat:
        try:
            planned = plan(_load_recipe(runtime, job_id), _registry_resolver(runtime))
            try:
                result = merge(planned, output, options=ExecOptions(settings.merge_threads, settings.merge_device),
                               progress=heartbeat.record, should_cancel=heartbeat.should_stop,
                               tmp_dir=settings.tmp_dir, compute_sha256=True)
            finally:
                planned.close()
            stored = artifact_path(settings, result.sha256)
            stored.parent.mkdir(parents=True, exist_ok=True)
            os.replace(result.path, stored)  # same bytes if another attempt got here first
            filename = f"{planned.recipe.name or f'merge-{job_id}'}.safetensors"
            outcome = dict(status="succeeded", artifact=(result.sha256, result.size, filename, result.metadata))
        except MergeCancelled:
            outcome = dict(status="cancelled")
        except SdmergeError as exc:
            outcome = dict(status="failed", error=exc.to_dict())
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job_id)
            outcome = dict(status="failed", error={"code": "internal_error", "message": repr(exc), "details": {}})
        finally:
            output.unlink(missing_ok=True)
        progress = heartbeat.snapshot()
    if heartbeat.lost:
        log.warning("job %s: lease lost to another worker; this attempt's outcome is dropped", job_id)
        return None
    return finish(runtime, job_id, owner, progress=progress, **outcome)


def claim(runtime: Runtime, job_id: int, owner: str) -> bool:
    now = utcnow()
    with runtime.sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.cancel_requested.is_(False),
                   or_(Job.status == "queued", and_(Job.status == "running", Job.lease_expires_at < now)))
            .values(status="running", lease_owner=owner, attempts=Job.attempts + 1,
                    lease_expires_at=now + timedelta(seconds=runtime.settings.job_lease_seconds),
                    started_at=func.coalesce(Job.started_at, now), error=None)
        )
        return result.rowcount == 1


def finish(runtime: Runtime, job_id: int, owner: str, *, status: str, progress: dict | None,
           error: dict | None = None, artifact: tuple | None = None) -> str | None:
    with runtime.sessions.begin() as session:
        artifact_id = _store_artifact(session, *artifact) if artifact else None
        values = dict(status=status, finished_at=utcnow(), lease_owner=None, lease_expires_at=None,
                      error=error, artifact_id=artifact_id, progress=progress)
        if status != "succeeded":
            values["live_recipe_hash"] = None
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running").values(**values)
        )
        if result.rowcount != 1:
            session.rollback()
            return None
    log.info("job %s: %s", job_id, status)
    return status


def _store_artifact(session: Session, sha256: str, size: int, filename: str, metadata: dict) -> int:
    existing = session.scalar(select(Artifact.id).where(Artifact.sha256 == sha256))
    if existing is not None:
        return existing
    try:
        with session.begin_nested():
            artifact = Artifact(sha256=sha256, size=size, filename=filename, header_metadata=metadata)
            session.add(artifact)
        return artifact.id
    except IntegrityError:  # identical bytes stored by a concurrent job
        return session.scalar(select(Artifact.id).where(Artifact.sha256 == sha256))


def _load_recipe(runtime: Runtime, job_id: int):
    with runtime.sessions() as session:
        return parse_recipe(session.get(Job, job_id).recipe)


def _registry_resolver(runtime: Runtime):
    """Canonical recipes name every leaf by sha256; the file must still be the one hashed."""

    def resolve(leaf) -> ResolvedModel:
        sha256 = leaf.sha256 if isinstance(leaf, ModelLeaf) else None
        with runtime.sessions() as session:
            models = list(session.scalars(select(Model).where(Model.sha256 == sha256, Model.status == "ready")))
        for model in models:
            path = Path(model.path)
            try:
                stat = path.stat()
            except OSError:
                continue
            if (stat.st_size, stat.st_mtime_ns) == (model.size, model.mtime_ns):
                return ResolvedModel(path, model.name, model.sha256, model.legacy_hash)
        label = leaf.label() if isinstance(leaf, ModelLeaf) else str(leaf)
        raise ResolveError("the model was removed or changed since the job was submitted", model=label)

    return resolve


class Heartbeat:
    """Renews the lease, publishes the latest progress and picks up the cancel flag, on a
    timer: the engine's callbacks only touch memory, so no tensor waits on the database."""

    def __init__(self, runtime: Runtime, job_id: int, owner: str) -> None:
        self.runtime, self.job_id, self.owner = runtime, job_id, owner
        self.interval = min(1.0, runtime.settings.job_lease_seconds / 4)
        self.lost = False
        self._progress: Progress | None = None
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._beat_safely()  # at once: a cancel that came in since the claim stops the merge early
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def record(self, progress: Progress) -> None:
        self._progress = progress

    def should_stop(self) -> bool:
        return self._cancel.is_set()

    def snapshot(self) -> dict | None:
        p = self._progress
        if p is None:
            return None
        rate = p.bytes_read / p.elapsed if p.elapsed > 0 else None
        return {**asdict(p), "rate_bytes_per_second": rate, "eta_seconds": p.eta}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat_safely()

    def _beat_safely(self) -> None:
        try:
            self.beat()
        except Exception:  # a database hiccup: the lease has slack for a few missed beats
            log.exception("job %s: heartbeat failed", self.job_id)

    def beat(self) -> None:
        lease = timedelta(seconds=self.runtime.settings.job_lease_seconds)
        with self.runtime.sessions.begin() as session:
            row = session.execute(
                update(Job).where(Job.id == self.job_id, Job.lease_owner == self.owner, Job.status == "running")
                .values(lease_expires_at=utcnow() + lease, progress=self.snapshot())
                .returning(Job.cancel_requested)
            ).first()
        if row is None:
            self.lost = True
            self._cancel.set()
        elif row.cancel_requested:
            self._cancel.set()
