"""Celery tasks: each takes an id, and one function does the work against the SQL row."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from celery import shared_task

from app.logs import working_on
from app.models import Model
from app.queue import ANALYSIS_TASK, HASH_TASK, MERGE_TASK, PREVIEW_TASK, SHARD_TASK
from app.runtime import Runtime, make_runtime
from app.settings import get_settings
from worker.analyses import run_analysis
from worker.hashing import hash_model
from worker.jobs import run_merge_job
from worker.lease import Vouch
from worker.previews import run_preview
from worker.shards import run_merge_shard


def run_hash(runtime: Runtime, model_id: int) -> None:
    """A big file takes longer than a lease to hash: vouch for it meanwhile (worker/reaper.py)."""
    with working_on(kind="model", job_id=model_id), Vouch(runtime, Model, model_id, "hashing"):
        hash_model(runtime.sessions, model_id)


# What each task runs, given the process's runtime and the row id (tests run these directly).
HANDLERS: dict[str, Callable[[Runtime, int], Any]] = {
    MERGE_TASK: run_merge_job,
    HASH_TASK: run_hash,
    ANALYSIS_TASK: run_analysis,
    PREVIEW_TASK: run_preview,
    SHARD_TASK: run_merge_shard,
}


@lru_cache(maxsize=1)
def worker_runtime() -> Runtime:
    return make_runtime(get_settings())


@shared_task(bind=True, name=MERGE_TASK)
def merge_task(self, job_id: int) -> None:
    with working_on(task_id=self.request.id):
        run_merge_job(worker_runtime(), job_id)


@shared_task(bind=True, name=HASH_TASK)
def hash_model_task(self, model_id: int) -> None:
    with working_on(task_id=self.request.id):
        run_hash(worker_runtime(), model_id)


@shared_task(bind=True, name=ANALYSIS_TASK)
def analysis_task(self, analysis_id: int) -> None:
    with working_on(task_id=self.request.id):
        run_analysis(worker_runtime(), analysis_id)


@shared_task(bind=True, name=PREVIEW_TASK)
def preview_task(self, preview_id: int) -> None:
    with working_on(task_id=self.request.id):
        run_preview(worker_runtime(), preview_id)


@shared_task(bind=True, name=SHARD_TASK)
def merge_shard_task(self, shard_id: int) -> None:
    with working_on(task_id=self.request.id):
        run_merge_shard(worker_runtime(), shard_id)
