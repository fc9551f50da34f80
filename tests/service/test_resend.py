"""The reaper's re-sends against real brokers and databases: two reapers at once send a lost
message once; what a consumer killed mid-claim left is put back rather than re-sent; a broker
that cannot be read gets nothing re-sent until its rows have waited many leases."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import pytest

from app.settings import settings_from_env
from tests.service.conftest import free_port

LEASE = 5


def _runtime(tmp_path, database_url, **env):
    from app.runtime import make_runtime

    return make_runtime(settings_from_env({"SDMERGE_DATA_DIR": str(tmp_path / "data"),
                                           "SDMERGE_DATABASE_URL": database_url,
                                           "SDMERGE_JOB_LEASE_SECONDS": str(LEASE), **env}))


def _job(runtime, sent_leases_ago: float, *, send: bool) -> int:
    """A queued job sent that long ago; its message is in the broker only if `send`."""
    from app.dispatch import enqueue
    from app.models import Job, utcnow
    from app.queue import MERGE_TASK

    with runtime.sessions() as session:
        job = Job(status="queued", recipe={}, recipe_hash=os.urandom(32).hex(), cancel_requested=False,
                  attempts=0, dispatched_at=utcnow() - timedelta(seconds=sent_leases_ago * LEASE))
        session.add(job)
        session.flush()
        if send:
            enqueue(session, MERGE_TASK, job.id)
        session.commit()
        return job.id


def _messages(runtime) -> list[tuple[str, int]]:
    """Every message of the merge queue, duplicates included, taken off the queue."""
    found = []
    with runtime.celery.connection_for_read() as connection:
        queue = connection.SimpleQueue("merge")
        while True:
            try:
                message = queue.get(block=False)
            except queue.Empty:
                return sorted(found)
            found.append((message.headers["task"], message.payload[0][0]))
            message.ack()


def test_two_reapers_at_once_resend_each_lost_message_once(tmp_path, database_url):
    from worker.reaper import reap

    runtimes = [_runtime(tmp_path, database_url) for _ in range(2)]  # two workers, one broker folder
    lost = sorted(_job(runtimes[0], 2, send=False) for _ in range(30))
    start, reports = threading.Barrier(2), []

    def reaper(runtime):
        start.wait()
        reports.append(reap(runtime)["resent"])

    threads = [threading.Thread(target=reaper, args=(r,)) for r in runtimes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(reports[0] + reports[1]) == lost, reports  # each once, by one reaper or the other
    assert _messages(runtimes[0]) == [("sdmerge.merge", i) for i in lost]
    for runtime in runtimes:
        runtime.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_what_a_killed_consumer_left_claimed_is_put_back_not_resent(tmp_path, database_url):
    from app.broker import WRITING, waiting
    from worker.reaper import reap

    runtime = _runtime(tmp_path, database_url)
    held = _job(runtime, 3, send=True)
    folder = runtime.settings.broker_dir
    (name,) = [n for n in os.listdir(folder) if n.endswith(".merge.msg")]
    # A consumer killed between claiming the file (renamed under its claim time) and reading it.
    claimed_at = round((time.time() - 2 * LEASE) * 1000)
    (folder / "claimed").mkdir(exist_ok=True)
    os.rename(folder / name, folder / "claimed" / f"{claimed_at}-{name}")
    # A publisher killed mid-write.
    half = folder / f".{name}{WRITING}"
    half.write_bytes(b'{"body": ')
    os.utime(half, (time.time() - 2 * LEASE,) * 2)
    with runtime.celery.connection_for_read() as connection:
        assert waiting(connection, "merge", taken_within=LEASE) == set()
    report = reap(runtime)
    assert report["resent"] == [], report  # its own message is back in the queue: no duplicate
    assert not os.listdir(folder / "claimed") and not half.exists()
    assert _messages(runtime) == [("sdmerge.merge", held)]
    runtime.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_message_just_taken_by_a_worker_is_not_taken_for_lost(tmp_path, database_url):
    """Between a worker's take of a message and its claim of the row, the row is queued and its
    message is out of the queue: it counts as waiting for a lease (as Redis's unacknowledged do)."""
    from worker.reaper import reap

    runtime = _runtime(tmp_path, database_url)
    job = _job(runtime, 3, send=True)
    assert _messages(runtime) == [("sdmerge.merge", job)]  # taken; the row not claimed yet
    assert reap(runtime)["resent"] == []
    taken = runtime.settings.broker_dir / "taken"
    (name,) = os.listdir(taken)
    stamp, _, rest = name.partition("-")
    os.rename(taken / name, taken / f"{int(stamp) - 2 * LEASE * 1000}-{rest}")  # a lease ago: its worker died
    assert reap(runtime)["resent"] == [job]
    assert not os.listdir(taken)
    runtime.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_broker_that_cannot_be_read_gets_only_long_lost_work_resent(tmp_path, database_url):
    from worker.reaper import BLIND_RESEND_AFTER_LEASES, reap

    runtime = _runtime(tmp_path, database_url, SDMERGE_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    recent = _job(runtime, 2, send=False)  # a lease late: a broker that is down may still hold it
    ancient = _job(runtime, BLIND_RESEND_AFTER_LEASES + 1, send=False)
    report = reap(runtime)  # the sends fail too (logged); the rows wait for the next lease
    assert report["resent"] == [ancient], report
    assert recent not in report["resent"]
    runtime.close()
