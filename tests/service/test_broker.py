"""The brokers: the embedded one loses no message in a burst with a consumer racing the producer
(Kombu's own filesystem transport does); a message lost after its commit is sent again within
about a lease, in both modes; one still waiting in the queue is not sent again."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from sqlalchemy import update

from app.settings import settings_from_env
from tests.service.servers import REPO

BURST = 4000

PROGRAM = textwrap.dedent("""
    import json, sys, time
    import app.broker  # registers the embedded transport's scheme
    from kombu import Connection
    role, scheme, folder, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    options = {"data_folder_in": folder, "data_folder_out": folder, "control_folder": folder + "/control",
               "store_processed": False, "polling_interval": 0.001}
    with Connection(f"{scheme}://", transport_options=options) as connection:
        queue = connection.SimpleQueue("merge")
        if role == "produce":  # threads of a busy API process: each may be switched out mid-publish
            import threading
            sys.setswitchinterval(1e-5)

            def publish(thread):
                with connection.clone() as own:
                    mine = own.SimpleQueue("merge")
                    for i in range(thread, count, 4):
                        mine.put({"i": f"{sys.argv[5]}-{i}"})

            threads = [threading.Thread(target=publish, args=(t,)) for t in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sys.exit(0)
        got, errors, idle = set(), 0, time.monotonic()
        while time.monotonic() - idle < 5 and len(got) < count:
            try:
                message = queue.get(block=True, timeout=0.05)
            except queue.Empty:
                continue
            except Exception:  # the stock transport: a half-written file fails the decode
                errors += 1
                continue
            got.add(message.payload["i"])
            message.ack()
            idle = time.monotonic()
        print(json.dumps({"received": len(got), "errors": errors}))
""")


def _burst(tmp_path, scheme: str) -> dict:
    folder = tmp_path / scheme
    (folder / "control").mkdir(parents=True)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    args = [str(folder), str(BURST)]
    consumer = subprocess.Popen([sys.executable, "-c", PROGRAM, "consume", scheme, *args], env=env,
                                stdout=subprocess.PIPE, text=True)
    producers = [subprocess.Popen([sys.executable, "-c", PROGRAM, "produce", scheme, str(folder), str(BURST // 2),
                                   str(n)], env=env) for n in range(2)]
    for producer in producers:
        assert producer.wait(120) == 0
    out, _ = consumer.communicate(timeout=120)
    return json.loads(out)


@pytest.mark.xfail(reason="Kombu's filesystem transport: a consumer reads a message file between its "
                          "creation and its write (the defect this module's transport fixes)", strict=False)
def test_the_stock_filesystem_transport_loses_messages_in_a_burst(tmp_path):
    result = _burst(tmp_path, "filesystem")
    assert result == {"received": BURST, "errors": 0}, result


def test_the_embedded_broker_loses_nothing_in_a_burst(tmp_path):
    from app.broker import EMBEDDED_SCHEME

    assert _burst(tmp_path, EMBEDDED_SCHEME) == {"received": BURST, "errors": 0}


# -- re-sending what the broker lost, and only that ------------------------------------------------

@pytest.fixture(params=["embedded", "redis"])
def broker_runtime(request, tmp_path, database_url, model_root):
    """A runtime on the embedded broker or on a real Redis (its own database number)."""
    from app.runtime import make_runtime

    env = {"SDMERGE_DATA_DIR": str(tmp_path / "data"), "SDMERGE_DATABASE_URL": database_url,
           "SDMERGE_MODEL_ROOTS": str(model_root), "SDMERGE_JOB_LEASE_SECONDS": "5"}
    if request.param == "redis":
        import redis

        env["SDMERGE_BROKER_URL"] = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/5"
        redis.Redis.from_url(env["SDMERGE_BROKER_URL"]).flushdb()
    runtime = make_runtime(settings_from_env(env))
    yield runtime
    with runtime.celery.connection_for_write() as connection:
        for queue in ("merge", "hash", "preview"):
            connection.SimpleQueue(queue).clear()
    runtime.close()


def _queued_job(runtime, dispatched_seconds_ago: float) -> int:
    from app.dispatch import enqueue
    from app.models import Job, utcnow
    from app.queue import MERGE_TASK

    with runtime.sessions() as session:
        job = Job(status="queued", recipe={}, recipe_hash="x" * 64, cancel_requested=False, attempts=0,
                  dispatched_at=utcnow() - timedelta(seconds=dispatched_seconds_ago))
        session.add(job)
        session.flush()
        enqueue(session, MERGE_TASK, job.id)
        session.commit()
        return job.id


def test_a_lost_message_is_resent_after_a_lease_and_a_waiting_one_is_not(broker_runtime):
    from app.broker import waiting
    from app.models import Job, utcnow
    from worker.reaper import reap

    runtime = broker_runtime
    lease = runtime.settings.job_lease_seconds
    fresh = _queued_job(runtime, 0)
    behind = _queued_job(runtime, 3 * lease)  # sent long ago, its message still waits in the queue
    with runtime.celery.connection_for_read() as connection:
        assert waiting(connection, "merge") == {("sdmerge.merge", fresh), ("sdmerge.merge", behind)}
        connection.SimpleQueue("merge").clear()  # the broker restarted without persistence
    lost = _queued_job(runtime, 0)
    with runtime.celery.connection_for_read() as connection:
        assert waiting(connection, "merge") == {("sdmerge.merge", lost)}
    report = reap(runtime)
    assert report["resent"] == [behind], report  # `fresh` has not waited a lease yet; `lost` waits
    with runtime.sessions.begin() as session:  # a lease later
        session.execute(update(Job).where(Job.id == fresh).values(dispatched_at=utcnow() - timedelta(seconds=lease)))
    assert reap(runtime)["resent"] == [fresh]
    assert reap(runtime)["resent"] == []  # each once: the messages are in the queue again
    with runtime.celery.connection_for_read() as connection:
        assert waiting(connection, "merge") == {("sdmerge.merge", i) for i in (fresh, behind, lost)}
