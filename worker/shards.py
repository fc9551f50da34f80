"""Sharded merge jobs: one merge split across workers (merge_engine/shards.py).

The job's own task is the coordinator, under the job's lease: it plans, creates the shard rows
and the pre-sized shared partial file in the data dir, and sends one message per shard after
that commit. Any worker runs a shard (`run_merge_shard`, leased like a job); the coordinator
runs shards too, and once none is left to claim it waits for the others, publishing the sum of
their progress as the job's. When every shard has succeeded it runs the final step (checks,
header, sha256, rename) under the job's lease, so it runs once. A worker lost mid-shard: the
shard's lease lapses and the reaper (or the coordinator) runs it again. A lost coordinator: the
job's lease lapses, the job is re-sent, and the next attempt picks up the same shards and file.
A failed shard fails the job with its error; a cancel or a failure cancels the other shards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, select, update

from app.dispatch import enqueue
from app.models import Job, MergeShard, utcnow
from app.queue import SHARD_TASK
from app.runtime import Runtime
from app.services.files import shared_partial_path
from app.services.merges import cancel_shards
from merge_engine.errors import MergeCancelled, SdmergeError
from merge_engine.execute import ExecOptions, MergeResult
from merge_engine.plan import Plan, plan
from merge_engine.recipe import parse_recipe
from merge_engine.shards import (
    Shard,
    finish_sharded,
    prepare_partial,
    shard_count,
    split,
    write_shard,
)
from worker import lease
from worker.hashing import rehash_if_changed
from worker.lease import Heartbeat, Outcome

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2


class ShardFailed(SdmergeError):
    """A shard failed: the job fails with that shard's own error."""

    def __init__(self, index: int, error: dict) -> None:
        super().__init__(error.get("message", "a shard failed"))
        self.error = {**error, "details": {**error.get("details", {}), "shard": index}}

    def to_dict(self) -> dict:
        return self.error


def count_for(runtime: Runtime, planned: Plan, requested: int | None) -> int:
    """The job's own count (asked for at submit), else the setting's, else one per
    `shard_bytes` read: a small merge stays one task."""
    settings = runtime.settings
    return shard_count(planned, count=requested or settings.merge_shards, target_bytes=settings.shard_bytes)


def options_for(runtime: Runtime) -> ExecOptions:
    settings = runtime.settings
    return ExecOptions(settings.merge_threads, settings.merge_device, verify_inputs=settings.verify_inputs)


def run_merge_shard(runtime: Runtime, shard_id: int, planned: Plan | None = None) -> str | None:
    """Run one shard if it can be claimed; its final status, or None if it was not ours.
    `planned`: the job's plan, open, where the coordinator runs the shard (not planned again)."""
    return lease.run_leased(runtime, MergeShard, shard_id,
                            lambda heartbeat: _write(runtime, shard_id, heartbeat, planned))


def _write(runtime: Runtime, shard_id: int, heartbeat: Heartbeat, planned: Plan | None) -> Outcome:
    with runtime.sessions() as session:
        row = session.get(MergeShard, shard_id)
        job = session.get(Job, row.job_id)
        if job.status not in ("queued", "running") or job.cancel_requested:  # queued: its coordinator died
            raise MergeCancelled(f"the merge job is {'cancelled' if job.cancel_requested else job.status}")
        shard = Shard(row.index, row.first_key, row.stop_key, row.start, row.end, row.bytes_to_read)
        recipe, partial = job.recipe, shared_partial_path(runtime.settings, job.id, job.recipe_hash)
    from worker.jobs import registry_resolver

    with rehash_if_changed(runtime.sessions):  # this attempt fails; the file's hashes are stale
        shard_plan = planned if planned is not None else plan(parse_recipe(recipe), registry_resolver(runtime))
        try:
            digest = write_shard(shard_plan, partial, shard, options=options_for(runtime),
                                 progress=heartbeat.record, should_cancel=heartbeat.should_stop)
        finally:
            if shard_plan is not planned:
                shard_plan.close()
    return Outcome("succeeded", values={"sha256": digest})


def run_sharded(runtime: Runtime, job_id: int, heartbeat: Heartbeat, planned: Plan, count: int,
                output: Path) -> MergeResult:
    """The coordinator: shards, then the final step into `output`. Raises what the job fails
    with (a shard's error, MergeCancelled); the shared file is removed unless the job's lease
    was lost (then the next attempt goes on with it)."""
    shards = split(planned, count)
    with runtime.sessions() as session:
        partial = shared_partial_path(runtime.settings, job_id, session.get(Job, job_id).recipe_hash)
    try:
        _start(runtime, job_id, planned, shards, partial)
        heartbeat.record(ShardsProgress(runtime, job_id, len(planned.keys)))
        digests = _run_until_done(runtime, job_id, heartbeat, planned)
        heartbeat.check()
        return finish_sharded(planned, partial, output, shards, digests, overwrite=True)
    except BaseException:
        if not heartbeat.lost:
            with runtime.sessions.begin() as session:
                cancel_shards(session, job_id)
            partial.unlink(missing_ok=True)
        raise


def _start(runtime: Runtime, job_id: int, planned: Plan, shards: list[Shard], partial: Path) -> None:
    """Create the shard rows and the shared file, and send the shards' messages after the
    commit; or, on a later attempt of the job, go on with those already there."""
    with runtime.sessions.begin() as session:
        rows = list(session.scalars(select(MergeShard).where(MergeShard.job_id == job_id)
                                    .order_by(MergeShard.index).with_for_update()))
        same = [(r.first_key, r.stop_key, r.start, r.end) for r in rows] == [
            (s.first, s.stop, s.start, s.end) for s in shards]
        if same and partial.exists() and all(r.status not in ("failed", "cancelled") for r in rows):
            log.info("job %s: going on with its %d shards", job_id, len(rows))
            return
        session.execute(delete(MergeShard).where(MergeShard.job_id == job_id))
        partial.unlink(missing_ok=True)
        prepare_partial(planned, partial)
        now = utcnow()
        new = [MergeShard(job_id=job_id, index=s.index, first_key=s.first, stop_key=s.stop, start=s.start,
                          end=s.end, bytes_to_read=s.bytes_to_read, status="queued", cancel_requested=False,
                          attempts=0, dispatched_at=now) for s in shards]
        session.add_all(new)
        session.execute(update(Job).where(Job.id == job_id).values(shards=len(shards)))
        session.flush()
        for row in new:
            enqueue(session, SHARD_TASK, row.id)
    log.info("job %s: split into %d shards", job_id, len(shards))


def _run_until_done(runtime: Runtime, job_id: int, heartbeat: Heartbeat, planned: Plan) -> list[str | None]:
    """Run shards nobody holds (queued, or whose lease lapsed) until none is left, then wait for
    those others run; the shards' digests once all succeeded."""
    while True:
        heartbeat.check()
        with runtime.sessions() as session:
            rows = list(session.execute(select(MergeShard.id, MergeShard.index, MergeShard.status,
                                               MergeShard.lease_expires_at, MergeShard.error, MergeShard.sha256)
                                        .where(MergeShard.job_id == job_id).order_by(MergeShard.index)))
        if failed := next((r for r in rows if r.status in ("failed", "cancelled")), None):
            if failed.status == "cancelled":
                raise MergeCancelled(f"shard {failed.index} of the merge was cancelled")
            raise ShardFailed(failed.index, failed.error or {"code": "internal_error", "message": "a shard failed"})
        if all(r.status == "succeeded" for r in rows):
            return [r.sha256 for r in rows]
        now = utcnow()
        free = [r for r in rows if r.status == "queued" or (r.status == "running" and r.lease_expires_at < now)]
        if not free or run_merge_shard(runtime, free[0].id, planned) is None:
            time.sleep(POLL_SECONDS)


@dataclass
class ShardsProgress:
    """The job's progress while its shards run: the sum of theirs, read at each heartbeat."""

    runtime: Runtime
    job_id: int
    tensors_total: int
    started: float = field(default_factory=time.perf_counter)

    def describe(self) -> dict:
        with self.runtime.sessions() as session:
            rows = list(session.execute(select(MergeShard.status, MergeShard.progress, MergeShard.bytes_to_read,
                                               MergeShard.first_key, MergeShard.stop_key)
                                        .where(MergeShard.job_id == self.job_id)))
        done = {"tensors_done": 0, "bytes_read": 0}
        for row in rows:
            if row.status == "succeeded" and not row.progress:  # it ended before its first heartbeat
                progress = {"tensors_done": row.stop_key - row.first_key, "bytes_read": row.bytes_to_read}
            else:
                progress = row.progress or {}
            for name in done:
                done[name] += progress.get(name, 0)
        total = sum(r.bytes_to_read for r in rows)
        elapsed = time.perf_counter() - self.started
        rate = done["bytes_read"] / elapsed if elapsed > 0 else None
        eta = elapsed * (total - done["bytes_read"]) / done["bytes_read"] if done["bytes_read"] else None
        counts = {s: sum(r.status == s for r in rows) for s in ("queued", "running", "succeeded")}
        return {**done, "tensors_total": self.tensors_total, "bytes_total": total, "elapsed": elapsed, "rate_bytes_per_second": rate,
                "eta_seconds": eta, "shards": {"total": len(rows), **counts}}


def describe(progress) -> dict:
    """A job's heartbeat: a one-task merge's own progress, or its shards' sum."""
    return progress.describe() if isinstance(progress, ShardsProgress) else lease.stream_progress(progress)
