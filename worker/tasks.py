"""Celery tasks: each takes an id, and one function does the work against the SQL row."""

from __future__ import annotations

from functools import lru_cache

from celery import shared_task

from app.runtime import Runtime, make_runtime
from app.settings import get_settings
from worker.celery_app import HASH_TASK, MERGE_TASK
from worker.hashing import hash_model
from worker.jobs import run_merge_job


@lru_cache(maxsize=1)
def worker_runtime() -> Runtime:
    return make_runtime(get_settings())


@shared_task(name=MERGE_TASK)
def merge_task(job_id: int) -> None:
    run_merge_job(worker_runtime(), job_id)


@shared_task(name=HASH_TASK)
def hash_model_task(model_id: int) -> None:
    hash_model(worker_runtime().sessions, model_id)
