"""Scale-out on real servers: PostgreSQL, redis-server, `sdmerge serve` (API only) and two
`sdmerge worker` processes sharing one data dir. Twenty concurrent jobs each complete exactly
once; a worker SIGKILLed mid-merge loses nothing: its job completes once, on the other worker."""

from __future__ import annotations

import re
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.service.conftest import SLOW_RECIPE, create_database, drop_database, free_port
from tests.service.servers import SDMERGE, Process, service_env, wait_for, wait_healthy, wait_job

LEASE_SECONDS = 2
REDIS_DB = 7


def cluster_of(count: int, tmp_path, model_root, postgres_server_url, redis_url, **settings: str):
    """`sdmerge serve` (API only) and `count` workers on one data dir, PostgreSQL and Redis:
    yields (client, server, workers, database URL); everything stopped and dropped after."""
    database = create_database(postgres_server_url, "sdmerge_scale")
    broker = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(broker).flushdb()
    env = service_env(SDMERGE_DATABASE_URL=database, SDMERGE_BROKER_URL=broker,
                      SDMERGE_DATA_DIR=str(tmp_path / "data"), SDMERGE_MODEL_ROOTS=str(model_root),
                      SDMERGE_JOB_LEASE_SECONDS=str(LEASE_SECONDS), SDMERGE_MERGE_THREADS="1",
                      SDMERGE_HASH_CACHE=str(tmp_path / "hashes.sqlite3"), **settings)
    subprocess.run([*SDMERGE, "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    processes = [Process([*SDMERGE, "serve", "--port", str(port)], env, tmp_path / "serve.log")]
    try:
        for n in range(1, count + 1):
            processes.append(Process([*SDMERGE, "worker"], env, tmp_path / f"worker{n}.log"))
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, processes[0])
        with httpx.Client(base_url=base, timeout=60) as client:
            wait_for(lambda: client.get("/ready").status_code == 200, 30, "the API to be ready")
            yield client, processes[0], processes[1:], database
    finally:
        for process in processes:
            process.stop()
        assert not processes[0].children(), "serve started a worker although a broker URL is set"
        drop_database(postgres_server_url, database)
        redis.Redis.from_url(broker).flushdb()


@pytest.fixture
def cluster(tmp_path, model_root, postgres_server_url, redis_url):
    for client, server, workers, _database in cluster_of(2, tmp_path, model_root, postgres_server_url, redis_url):
        yield client, server, workers


def register(client, filenames: list[str]) -> list[str]:
    ids = [client.post("/models", json={"path": filename}).json()["id"] for filename in filenames]
    for model_id in ids:
        wait_for(lambda model_id=model_id: client.get(f"/models/{model_id}").json()["status"] == "ready",
                 60, f"model {model_id} to be hashed")
    return filenames


def completions(workers) -> dict[int, int]:
    counts: dict[int, int] = {}
    for worker in workers:
        for job_id in re.findall(r"job (\d+): succeeded", worker.output()):
            counts[int(job_id)] = counts.get(int(job_id), 0) + 1
    return counts


def test_twenty_concurrent_jobs_complete_exactly_once(cluster, tmp_path):
    client, _server, workers = cluster
    a, b = register(client, ["sd2-1.safetensors", "sd2-2.safetensors"])
    recipes = [{"merge": {"method": "weighted", "models": [
        {"model": a, "weight": i + 1}, {"model": b, "weight": 20 - i}]}} for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda r: client.post("/merges", json=r), recipes))
    assert [a.status_code for a in answers] == [202] * 20, [a.text for a in answers if a.status_code != 202]
    jobs = [wait_job(client, a.json()["id"], timeout=240) for a in answers]
    assert {j["status"] for j in jobs} == {"succeeded"}
    assert {j["attempts"] for j in jobs} == {1}
    assert completions(workers) == {j["id"]: 1 for j in jobs}
    assert all(completions([w]) for w in workers), "both workers should have taken jobs"
    stored = list((tmp_path / "data" / "artifacts").rglob("*.safetensors"))
    assert len(stored) == len({j["artifact"]["sha256"] for j in jobs}) == 20
    assert not list((tmp_path / "data" / "tmp").iterdir())


def test_worker_killed_mid_merge_job_completes_once(cluster, tmp_path):
    client, _server, workers = cluster
    register(client, SLOW_RECIPE["merge"]["models"])
    job = client.post("/merges", json=SLOW_RECIPE).json()

    def holder():  # the worker whose merge is writing its partial output right now
        if not any(f"job-{job['id']}-" in p.name for p in (tmp_path / "data" / "tmp").iterdir()):
            return None
        return next((w for w in workers if f"job {job['id']}: claimed" in w.output()), None)

    victim = wait_for(holder, 60, "a worker to be merging the job", interval=0.005)
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait()
    survivor = next(w for w in workers if w is not victim)
    done = wait_job(client, job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert f"job {job['id']}: succeeded" not in victim.output()
    assert completions([survivor]) == {job["id"]: 1}
    assert len(list((tmp_path / "data" / "artifacts").rglob("*.safetensors"))) == 1
    wait_for(lambda: not list((tmp_path / "data" / "tmp").iterdir()), 10, "the dead attempt's partial to go")
