"""Work that waits is not re-sent, on real processes in both modes: jobs queued behind a busy
worker (one worker, concurrency 1) keep their one message for as many leases as they wait, and
a model whose hash outlasts several leases is hashed once (its worker vouches for it)."""

from __future__ import annotations

import re
import subprocess
import time

import httpx
import pytest

from tests.service.conftest import SLOW_RECIPE, create_database, drop_database, free_port
from tests.service.servers import SDMERGE, Process, service_env, wait_for, wait_healthy, wait_job
from tests.service.test_faults import _sparse_checkpoint, slow_recipes
from tests.service.test_scale_out import completions, register

LEASE_SECONDS = 2
REAPER_INTERVAL = max(0.5, LEASE_SECONDS / 3)  # app.settings.Settings.reaper_interval


@pytest.fixture(params=["embedded", "redis"])
def one_worker(request, tmp_path, model_root):
    """`sdmerge serve` with its child worker (SQLite, the filesystem broker), or PostgreSQL,
    redis-server, `sdmerge serve` (API only) and one `sdmerge worker`."""
    settings = dict(SDMERGE_DATA_DIR=str(tmp_path / "data"), SDMERGE_MODEL_ROOTS=str(model_root),
                    SDMERGE_JOB_LEASE_SECONDS=str(LEASE_SECONDS), SDMERGE_MERGE_THREADS="1",
                    SDMERGE_HASH_CACHE=str(tmp_path / "hashes.sqlite3"))
    database = None
    if request.param == "redis":
        server = request.getfixturevalue("postgres_server_url")
        database = create_database(server, "sdmerge_waiting")
        settings.update(SDMERGE_DATABASE_URL=database,
                        SDMERGE_BROKER_URL=request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/8")
    env = service_env(**settings)
    port = free_port()
    processes = [Process([*SDMERGE, "serve", "--port", str(port)], env, tmp_path / "serve.log")]
    if database:
        import redis

        redis.Redis.from_url(settings["SDMERGE_BROKER_URL"]).flushdb()
        subprocess.run([*SDMERGE, "db", "upgrade"], env=env, check=True, capture_output=True)
        processes.append(Process([*SDMERGE, "worker"], env, tmp_path / "worker.log"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, processes[0])
        with httpx.Client(base_url=base, timeout=60) as client:
            wait_for(lambda: client.get("/ready").status_code == 200, 30, "the API to be ready")
            yield client, processes[-1]  # the worker's output: serve's own in the embedded mode
    finally:
        for process in processes:
            process.stop()
        if database:
            drop_database(server, database)


def _waited(job: dict) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(job["started_at"]) - datetime.fromisoformat(job["created_at"])).total_seconds()


def _hash_rate(tmp_path) -> float:
    """Bytes a second this machine hashes a sparse checkpoint at (the size of the big one is
    chosen from it, so its hash outlasts several leases whatever the machine)."""
    from merge_engine.inspect import inspect_version

    probe = tmp_path / "probe.safetensors"
    _sparse_checkpoint(probe, 0.25)
    started = time.monotonic()
    inspect_version(probe, hashes=True)
    rate = probe.stat().st_size / (time.monotonic() - started)
    probe.unlink()
    return rate


def test_work_waiting_for_a_busy_worker_is_sent_once(one_worker, tmp_path, model_root):
    client, worker = one_worker
    register(client, SLOW_RECIPE["merge"]["models"])
    hashes = worker.output().count("Task sdmerge.hash_model[")
    gigabytes = min(32.0, max(1.0, _hash_rate(tmp_path) * 4 * LEASE_SECONDS / 2**30))
    _sparse_checkpoint(model_root / "big.safetensors", gigabytes)
    model = client.post("/models", json={"path": "big.safetensors"}).json()
    wait_for(lambda: worker.output().count("Task sdmerge.hash_model[") > hashes, 60, "the worker to be hashing")
    jobs = [client.post("/merges", json=recipe).json() for recipe in slow_recipes(3)]  # queued behind the hash
    done = [wait_job(client, job["id"], timeout=240) for job in jobs]
    ready = client.get(f"/models/{model['id']}").json()
    assert ready["status"] == "ready", ready
    assert {j["status"] for j in done} == {"succeeded"}, done
    # What this is about: the hash and the jobs behind it lasted longer than a lost message waits.
    took = [float(t) for t in re.findall(r"Task sdmerge\.hash_model\[[^\]]+\] succeeded in ([\d.]+)s",
                                         worker.output())]
    assert max(took) > LEASE_SECONDS + 2 * REAPER_INTERVAL, (gigabytes, took)
    assert min(_waited(j) for j in done) > LEASE_SECONDS + 2 * REAPER_INTERVAL, done
    assert "'resent'" not in worker.output() and "'rehash'" not in worker.output()
    assert worker.output().count(f"model {model['id']}: ready") == 1
    assert {j["attempts"] for j in done} == {1}, done
    assert completions([worker]) == {j["id"]: 1 for j in done}
    assert len(list((tmp_path / "data" / "artifacts").rglob("*.safetensors"))) == len(done)
