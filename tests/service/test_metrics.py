"""`GET /metrics` and `GET /system/status` against real jobs run by the real worker code: a merge
that succeeds, one that fails, one whose lease lapsed, a preview; the exposition parsed with
Prometheus' own parser. On SQLite and PostgreSQL with the embedded broker, and with Redis."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from app.models import Job, utcnow
from app.settings import settings_from_env
from merge_engine import __version__
from tests.service.test_previews import TINY
from worker.lease import claim
from worker.reaper import reap


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def run_the_jobs(client, run_tasks, runtime, ready_model, settings, model_root):
    """A merge that succeeds, one that fails (its input changed after hashing), one run twice
    (its first lease lapsed) and a preview; returns the queue depth seen before the run."""
    ready_model("sd2-1.safetensors", "a")
    ready_model("sd2-2.safetensors", "b")
    shutil.copy(model_root / "sd2-3.safetensors", model_root / "victim.safetensors")
    ready_model("victim.safetensors", "victim")
    ok = client.post("/merges", json={"merge": {"method": "uniform", "models": ["a", "b"]}}).json()
    doomed = client.post("/merges", json={"merge": {"method": "uniform", "models": ["a", "victim"]}}).json()
    lapsed = client.post("/merges", json={"merge": {"method": "weighted", "models": [
        {"model": "a", "weight": 1}, {"model": "b", "weight": 3}]}}).json()
    stat = os.stat(model_root / "victim.safetensors")
    os.utime(model_root / "victim.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    before = scrape(client)
    # A worker claimed `lapsed` and died: its lease expires, the reaper puts it back in the queue.
    assert claim(runtime, Job, lapsed["id"], "dead-worker")
    with runtime.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == lapsed["id"])
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert reap(runtime)["requeued"] == [lapsed["id"]]
    run_tasks()
    preview = client.post("/previews", json={**TINY, "targets": ["a"]}).json()
    run_tasks()
    jobs = {name: client.get(f"/merges/{j['id']}").json() for name, j in
            (("ok", ok), ("doomed", doomed), ("lapsed", lapsed))}
    assert [jobs[n]["status"] for n in ("ok", "doomed", "lapsed")] == ["succeeded", "failed", "succeeded"]
    assert jobs["lapsed"]["attempts"] == 2
    assert client.get(f"/previews/{preview['id']}").json()["status"] == "succeeded"
    return before, jobs


def check_metrics(client, before, jobs, settings):
    assert value(before, "sdmerge_queue_depth", queue="merge") == 3
    assert value(before, "sdmerge_jobs", kind="merge", status="queued") == 3
    samples = scrape(client)
    assert value(samples, "sdmerge_broker_up") == 1
    assert value(samples, "sdmerge_queue_depth", queue="merge") == 0
    assert value(samples, "sdmerge_jobs", kind="merge", status="succeeded") == 2
    assert value(samples, "sdmerge_jobs", kind="merge", status="failed") == 1
    assert value(samples, "sdmerge_jobs", kind="merge", status="queued") == 0
    assert value(samples, "sdmerge_jobs", kind="preview", status="succeeded") == 1
    assert value(samples, "sdmerge_jobs", kind="analysis", status="succeeded") == 0
    assert value(samples, "sdmerge_models", status="ready") == 3
    assert value(samples, "sdmerge_lease_expiries_total", kind="merge") == 1
    assert value(samples, "sdmerge_lease_expiries_total", kind="preview") == 0
    # Durations: every finished merge counted once, in the +Inf bucket and the right status.
    assert value(samples, "sdmerge_job_duration_seconds_count", kind="merge", status="succeeded") == 2
    assert value(samples, "sdmerge_job_duration_seconds_bucket", kind="merge", status="succeeded", le="+Inf") == 2
    assert value(samples, "sdmerge_job_duration_seconds_count", kind="merge", status="failed") == 1
    assert value(samples, "sdmerge_job_duration_seconds_count", kind="preview", status="succeeded") == 1
    assert 0 < value(samples, "sdmerge_job_duration_seconds_sum", kind="merge", status="succeeded") < 300
    # Throughput totals are the succeeded jobs' own figures.
    succeeded = [jobs["ok"], jobs["lapsed"]]
    assert value(samples, "sdmerge_merge_read_bytes_total") == sum(j["progress"]["bytes_read"] for j in succeeded)
    assert value(samples, "sdmerge_merge_written_bytes_total") == sum(j["artifact"]["size"] for j in succeeded)
    assert value(samples, "sdmerge_merge_seconds_total") == pytest.approx(
        sum(j["progress"]["elapsed"] for j in succeeded))
    assert value(samples, "sdmerge_preview_images_total") == 1
    assert value(samples, "sdmerge_preview_seconds_total") > 0
    assert value(samples, "sdmerge_merge_rate_bytes_per_second") == 0  # nothing runs now
    free = shutil.disk_usage(settings.data_dir).free
    assert abs(value(samples, "sdmerge_data_free_bytes") - free) < 256 * 1024**2
    assert value(samples, "sdmerge_data_min_free_bytes") == settings.min_free_bytes

    status = client.get("/system/status").json()
    assert status["broker"] == {"status": "ok", "queues": {"merge": 0, "hash": 0, "preview": 0}}
    assert status["work"]["merge"]["succeeded"] == 2 and status["running"] == []
    assert [(f["kind"], f["id"], f["error"]["code"]) for f in status["recent_failures"]] == \
        [("merge", jobs["doomed"]["id"], jobs["doomed"]["error"]["code"])]


def test_metrics_reflect_real_jobs(client, run_tasks, runtime, ready_model, settings, model_root):
    before, jobs = run_the_jobs(client, run_tasks, runtime, ready_model, settings, model_root)
    check_metrics(client, before, jobs, settings)


@pytest.fixture
def redis_settings(tmp_path, model_root, redis_url):
    broker = redis_url.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(broker).flushdb()
    (tmp_path / "data").mkdir(exist_ok=True)
    yield settings_from_env({
        "SDMERGE_DATA_DIR": str(tmp_path / "data"), "SDMERGE_BROKER_URL": broker,
        "SDMERGE_MODEL_ROOTS": str(model_root), "SDMERGE_JOB_LEASE_SECONDS": "5",
        "SDMERGE_MERGE_THREADS": "1"})
    redis.Redis.from_url(broker).flushdb()


def test_metrics_with_redis_count_its_queues(redis_settings):
    """Scale-out: queue depth is the length of Redis' lists."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.migrate import upgrade

    app = create_app(redis_settings)
    upgrade(app.state.runtime.engine)
    with TestClient(app) as client:
        runtime = app.state.runtime
        for name in ("sd2-1.safetensors", "sd2-2.safetensors"):
            client.post("/models", json={"path": name})
        assert value(scrape(client), "sdmerge_queue_depth", queue="hash") == 2
        assert value(scrape(client), "sdmerge_jobs", kind="merge", status="queued") == 0
        assert client.get("/system/status").json()["broker"]["queues"] == {"merge": 0, "hash": 2, "preview": 0}
        assert value(scrape(client), "sdmerge_info", version=__version__, mode="scale-out") == 1
        runtime.close()


def test_metrics_need_the_token_when_one_is_set(settings):
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(replace(settings, api_token="s3cret"))) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/system/status").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
