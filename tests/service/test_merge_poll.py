"""GET /merges/{id}, the status poll, reads one row on a plain connection and makes its JSON
itself (`merges.job_json`, `Db.read`): the answer must be the bytes the response model made of
the ORM row before, in every state of a job, and on SQLite a poll must neither take nor wait for
the write lock."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from app.deps import DbDep
from app.models import Job
from app.schemas import JobOut
from app.services import merges


@pytest.fixture
def orm_route(client):
    """The route as it was (ORM row in a session, serialised by FastAPI's response model), to
    compare the poll with."""

    async def get_merge_via_orm(job_id: int, db: DbDep):
        return await db.run(merges.get_job, job_id)

    client.app.add_api_route("/orm-merges/{job_id}", get_merge_via_orm, response_model=JobOut)
    return lambda job_id: client.get(f"/orm-merges/{job_id}")


def add_job(runtime, **values) -> int:
    columns = {"status": "queued", "name": None, "recipe": {"merge": {"method": "uniform", "models": []}},
               "recipe_hash": "0" * 64, "cancel_requested": False, "attempts": 0, **values}
    with runtime.sessions.begin() as session:
        job = Job(**columns)
        session.add(job)
        session.flush()
        return job.id


def test_poll_answers_the_same_bytes_as_the_response_model(client, runtime, run_tasks, ready_model, orm_route):
    ready_model("sd2-1.safetensors", "a")
    ready_model("sd2-2.safetensors", "b")
    merged = client.post("/merges", json={"name": "soupe à l'oignon",
                                          "merge": {"method": "uniform", "models": ["a", "b"]}}).json()["id"]
    run_tasks()
    job_ids = [
        merged,  # succeeded: artifact, progress, started and finished times
        add_job(runtime),  # queued: every optional column null
        add_job(runtime, status="failed", name="ü ✓ \"quoted\"", recipe_hash="1" * 64, attempts=3,
                error={"code": "bad_checkpoint", "message": "∅", "details": {"n": 1e16, "x": 0.1}},
                progress={"fraction": 1 / 3, "eta_seconds": None, "bytes_read": 2**40, "big": 1e300}),
        add_job(runtime, status="cancelled", cancel_requested=True, recipe_hash="2" * 64, output_size=2**33,
                architecture="sdxl"),
    ]
    for job_id in job_ids:
        new, old = client.get(f"/merges/{job_id}"), orm_route(job_id)
        assert new.status_code == old.status_code == 200
        assert new.content == old.content
        assert new.headers["content-type"] == old.headers["content-type"] == "application/json"
        assert new.headers["content-length"] == old.headers["content-length"]
    succeeded = client.get(f"/merges/{merged}").json()
    assert succeeded["status"] == "succeeded" and succeeded["artifact"]["url"].startswith("/artifacts/")
    assert succeeded["created_at"].endswith("Z") and succeeded["artifact"]["created_at"].endswith("Z")


def test_poll_errors_are_unchanged(client, orm_route):
    for path in ("/merges/{}", "/orm-merges/{}"):
        missing = client.get(path.format(12345))
        assert missing.status_code == 404
        assert missing.json() == {"error": {"code": "not_found", "message": "no such merge job",
                                            "details": {"id": 12345}}}
        assert client.get(path.format("x")).json()["error"]["code"] == "invalid_request"


def test_poll_needs_the_token(tmp_path, settings):
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(replace(settings, api_token="s3cret"))) as client:
        job_id = add_job(client.app.state.runtime)
        assert client.get(f"/merges/{job_id}").status_code == 401
        answer = client.get(f"/merges/{job_id}", headers={"Authorization": "Bearer s3cret"})
        assert answer.status_code == 200 and answer.json()["id"] == job_id


def _sqlite_path(runtime) -> str:
    if runtime.engine.dialect.name != "sqlite":
        pytest.skip("SQLite locking")
    return runtime.engine.url.database


def test_sqlite_poll_reads_past_a_writer(client, runtime):
    """A worker holding the write lock (BEGIN IMMEDIATE, say a heartbeat) does not hold up a poll:
    it reads the last committed state from its WAL snapshot."""
    job_id = add_job(runtime)
    writer = sqlite3.connect(_sqlite_path(runtime), isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE jobs SET status = 'running' WHERE id = ?", (job_id,))
        assert client.get(f"/merges/{job_id}").json()["status"] == "queued"
        writer.execute("COMMIT")
        assert client.get(f"/merges/{job_id}").json()["status"] == "running"
    finally:
        writer.close()


def test_sqlite_poll_waits_in_a_thread_when_the_database_is_locked(client, runtime):
    """A connection in exclusive locking mode shuts readers out (it can only take that lock
    before the API's read connections are open): the poll then waits for the lock off the event
    loop, as every other request does, and answers once it is released."""
    job_id = add_job(runtime)
    locker = sqlite3.connect(_sqlite_path(runtime), isolation_level=None, check_same_thread=False)
    locker.execute("PRAGMA locking_mode=EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("UPDATE jobs SET attempts = 7 WHERE id = ?", (job_id,))
    locker.execute("COMMIT")  # the lock stays until the connection closes
    answers = []
    poll = threading.Thread(target=lambda: answers.append(client.get(f"/merges/{job_id}")))
    poll.start()
    poll.join(0.5)
    assert not answers and client.get("/health").status_code == 200  # the loop is free meanwhile
    locker.close()
    poll.join(60)
    assert answers[0].status_code == 200 and answers[0].json()["attempts"] == 7


def test_only_a_sqlite_file_gets_a_read_engine(tmp_path):
    from sqlalchemy import create_engine

    from app.db import sqlite_reader

    assert sqlite_reader(create_engine("sqlite://")) is None  # in memory: another database
    assert sqlite_reader(create_engine("postgresql+psycopg://u@localhost/db")) is None
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    assert sqlite_reader(engine) is sqlite_reader(engine) is not None
