"""The queue contract: task names, queues, and the Celery application, configured for long GPU
jobs. Importing this never imports torch, so the API sends tasks by name without loading them."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.broker import EMBEDDED_SCHEME
from app.settings import Settings

MERGE_TASK = "sdmerge.merge"
HASH_TASK = "sdmerge.hash_model"
ANALYSIS_TASK = "sdmerge.analysis"
PREVIEW_TASK = "sdmerge.preview"
SHARD_TASK = "sdmerge.merge_shard"  # one shard of a sharded merge job (worker/shards.py)
QUEUES = ("merge", "hash", "preview")
# Analyses stream every weight like merges do, so they share the merge queue and its workers.
TASK_QUEUE = {MERGE_TASK: "merge", HASH_TASK: "hash", ANALYSIS_TASK: "merge", PREVIEW_TASK: "preview",
              SHARD_TASK: "merge"}
# Longer than the longest merge: Redis hands an unacknowledged message to another worker only
# after this long. A crashed worker's job is picked up much sooner through its lapsed lease.
VISIBILITY_TIMEOUT = 12 * 3600


def broker_options(settings: Settings) -> tuple[str, dict]:
    if settings.embedded:
        folder = str(settings.broker_dir)
        return f"{EMBEDDED_SCHEME}://", {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    return settings.broker_url or "", {"visibility_timeout": VISIBILITY_TIMEOUT}


def make_celery(settings: Settings) -> Celery:
    url, transport_options = broker_options(settings)
    if settings.embedded:
        (settings.broker_dir / "control").mkdir(parents=True, exist_ok=True)
    app = Celery("sdmerge", set_as_current=False)
    app.conf.update(
        broker_url=url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,  # the SQL row is the truth about a job, not a result backend
        task_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="merge",
        task_routes={name: {"queue": queue} for name, queue in TASK_QUEUE.items()},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,  # one process per GPU; run more `sdmerge worker`s for more
        worker_pool="solo",
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.embedded,
        # Scale-out: task events for Flower (task-sent from the API, the rest from the workers).
        worker_send_task_events=not settings.embedded,
        task_send_sent_event=not settings.embedded,
    )
    return app
