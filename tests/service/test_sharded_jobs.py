"""Sharded merges through the service: one merge job split into shards that any workers run.

In process (the drain plays one worker): the artifact of a sharded job is the one-task merge's
bytes, shards are rows of their own, a bad count is a 422, a small merge stays one task, a
cancel reaches the shards. On real processes (PostgreSQL, Redis, the API and three `sdmerge
worker`s sharing the data dir): a worker SIGKILLed mid-shard loses nothing, its shard is run
again elsewhere and the job completes once with the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.pool import NullPool

from app.db import normalize_url
from app.models import MergeShard
from tests.service.conftest import SLOW_RECIPE
from tests.service.servers import wait_for, wait_job
from tests.service.test_metrics import scrape, value
from tests.service.test_scale_out import cluster_of, register

RECIPE = {"merge": {"method": "weighted", "models": [{"model": "a", "weight": 1}, {"model": "b", "weight": 2}]},
          "output": {"dtype": "fp32"}}


@pytest.fixture
def two_models(ready_model):
    ready_model("sd2-1.safetensors", "a")
    ready_model("sd2-2.safetensors", "b")


def artifact_bytes(settings, job: dict) -> bytes:
    sha256 = job["artifact"]["sha256"]
    return (settings.artifact_dir / sha256[:2] / f"{sha256}.safetensors").read_bytes()


ENGINES: dict[str, object] = {}


def shard_rows(database_url: str, job_id: int) -> list:
    if database_url not in ENGINES:
        ENGINES[database_url] = create_engine(normalize_url(database_url), poolclass=NullPool)
    with ENGINES[database_url].connect() as connection:
        return list(connection.execute(select(MergeShard.__table__).where(MergeShard.job_id == job_id)
                                       .order_by(MergeShard.index)))


def test_shards_give_the_same_artifact_as_one_task(client, run_tasks, two_models, settings):
    """The same recipe, once in one task and once in 3 shards: one artifact, byte for byte."""
    one = client.post("/merges", json={**RECIPE, "shards": 1}).json()
    run_tasks()
    one = client.get(f"/merges/{one['id']}").json()
    expected = hashlib.sha256(artifact_bytes(settings, one)).hexdigest()
    assert one["artifact"]["sha256"] == expected and one["shards"] == 1
    with client.app.state.runtime.sessions.begin() as session:  # let the recipe run again
        from app.models import Job

        session.get(Job, one["id"]).live_recipe_hash = None
    sharded = client.post("/merges", json={**RECIPE, "shards": 3}).json()
    assert sharded["id"] != one["id"]
    run_tasks()
    done = client.get(f"/merges/{sharded['id']}").json()
    assert done["status"] == "succeeded" and done["shards"] == 3, done
    assert done["artifact"]["sha256"] == expected and done["artifact"]["id"] == one["artifact"]["id"]
    assert done["progress"]["shards"]["succeeded"] == 3
    assert done["progress"]["bytes_read"] == done["progress"]["bytes_total"] > 0
    assert done["progress"]["tensors_done"] == done["progress"]["tensors_total"] > 0
    rows = shard_rows(settings.database_url, done["id"])
    assert [r.status for r in rows] == ["succeeded"] * 3 and all(r.sha256 for r in rows)
    assert rows[0].start < rows[1].start < rows[2].start and rows[2].end == done["output_size"]
    assert not list(settings.tmp_dir.iterdir())


def test_small_merges_stay_one_task_and_bad_counts_are_422(client, run_tasks, two_models, settings):
    job = client.post("/merges", json=RECIPE).json()
    assert run_tasks() == ["sdmerge.merge"]
    assert client.get(f"/merges/{job['id']}").json()["shards"] is None
    assert shard_rows(settings.database_url, job["id"]) == []
    for bad in (0, -1, 1.5, "3", True, 5000):
        response = client.post("/merges", json={**RECIPE, "name": "x", "shards": bad})
        assert response.status_code == 422 and "shards" in response.text, (bad, response.text)


def test_a_cancelled_sharded_job_cancels_its_shards(client, run_tasks, two_models, settings):
    job = client.post("/merges", json={**RECIPE, "shards": 3}).json()
    client.post(f"/merges/{job['id']}/cancel")
    assert run_tasks() == ["sdmerge.merge"]  # nothing to claim
    assert client.get(f"/merges/{job['id']}").json()["status"] == "cancelled"
    assert not list(settings.tmp_dir.iterdir())


@pytest.fixture
def three_workers(tmp_path, model_root, postgres_server_url, redis_url):
    yield from cluster_of(3, tmp_path, model_root, postgres_server_url, redis_url)


def test_a_worker_killed_mid_shard_loses_nothing(three_workers, tmp_path):
    client, _server, workers, database = three_workers
    register(client, SLOW_RECIPE["merge"]["models"])
    one = wait_job(client, client.post("/merges", json={**SLOW_RECIPE, "shards": 1}).json()["id"])
    assert one["status"] == "succeeded", one
    expected = (tmp_path / "data" / "artifacts" / one["artifact"]["sha256"][:2]
                / f"{one['artifact']['sha256']}.safetensors").read_bytes()
    sharded = client.post("/merges", json={**SLOW_RECIPE, "name": "sharded", "shards": 3}).json()

    def shard_holder():
        """A worker that is writing a shard and is not the job's coordinator."""
        running = [r for r in shard_rows(database, sharded["id"]) if r.status == "running"]
        for row in running:
            for worker in workers:
                log = worker.output()
                if f"shard {row.id}: claimed by {row.lease_owner}" in log and f"job {sharded['id']}: claimed" not in log:
                    return worker, row
        return None

    victim, row = wait_for(shard_holder, 120, "a worker to be writing a shard", interval=0.01)
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait()
    done = wait_job(client, sharded["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["shards"] == 3
    rows = {r.id: r for r in shard_rows(database, sharded["id"])}
    assert rows[row.id].status == "succeeded" and rows[row.id].attempts == 2
    survivors = [w for w in workers if w is not victim]
    assert sum(w.output().count(f"shard {row.id}: succeeded") for w in survivors) == 1
    assert sum(w.output().count(f"job {sharded['id']}: succeeded") for w in survivors) == 1
    sha256 = done["artifact"]["sha256"]
    got = (tmp_path / "data" / "artifacts" / sha256[:2] / f"{sha256}.safetensors").read_bytes()
    header = int.from_bytes(expected[:8], "little") + 8
    assert got[8 + int.from_bytes(got[:8], "little"):] == expected[header:]  # every tensor byte
    wait_for(lambda: not list((tmp_path / "data" / "tmp").iterdir()), 10, "the shared partial to go")
    assert re.search(rf"shard {row.id}: claimed", victim.output())


def succeeded(workers, kind: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for worker in workers:
        for row_id in re.findall(rf"{kind} (\d+): succeeded", worker.output()):
            counts[int(row_id)] = counts.get(int(row_id), 0) + 1
    return counts


def test_merges_some_sharded_previews_and_analyses_each_complete_once(three_workers, tmp_path):
    """The scale-out topology: 20 merges (every fourth in 3 shards), 4 previews and 2 analyses
    submitted at once to three workers: each completes exactly once."""
    client, _server, workers, database = three_workers
    a, b = register(client, ["sd2-1.safetensors", "sd2-2.safetensors"])
    recipes = [{"merge": {"method": "weighted", "models": [{"model": a, "weight": i + 1}, {"model": b, "weight": 20 - i}]},
                **({"shards": 3} if i % 4 == 0 else {})} for i in range(20)]
    previews = [{"targets": [a], "prompts": [f"a cube {i}"], "seeds": [i], "steps": 2, "width": 64, "height": 64}
                for i in range(4)]
    analyses = [{"models": [a, b], "components": ["text_encoder"], "metrics": ["l2"]},
                {"models": [a, b], "components": ["vae"], "metrics": ["cosine"]}]
    with ThreadPoolExecutor(8) as pool:
        merges = list(pool.map(lambda r: client.post("/merges", json=r), recipes))
        shown = list(pool.map(lambda r: client.post("/previews", json=r), previews))
        studied = list(pool.map(lambda r: client.post("/analyses", json=r), analyses))
    for answer in (*merges, *shown, *studied):
        assert answer.status_code == 202, answer.text
    jobs = [wait_job(client, m.json()["id"], timeout=240) for m in merges]
    assert {j["status"] for j in jobs} == {"succeeded"}, [j for j in jobs if j["status"] != "succeeded"]
    assert [j["shards"] for j in jobs] == [3 if i % 4 == 0 else None for i in range(20)]
    for path, answers in (("previews", shown), ("analyses", studied)):
        for answer in answers:
            done = wait_for(lambda a=answer, path=path: (r := client.get(f"/{path}/{a.json()['id']}").json())["status"]
                            in ("succeeded", "failed") and r, 240, f"{path} to finish")
            assert done["status"] == "succeeded", done
    assert succeeded(workers, "job") == {j["id"]: 1 for j in jobs}
    assert succeeded(workers, "preview") == {p.json()["id"]: 1 for p in shown}
    assert succeeded(workers, "analysis") == {s.json()["id"]: 1 for s in studied}
    shard_ids = [r.id for j in jobs if j["shards"] for r in shard_rows(database, j["id"])]
    assert len(shard_ids) == 15 and succeeded(workers, "shard") == dict.fromkeys(shard_ids, 1)
    assert all(succeeded([w], "shard") or succeeded([w], "job") for w in workers), "every worker took work"
    artifacts = list((tmp_path / "data" / "artifacts").rglob("*.safetensors"))
    assert len(artifacts) == 20
    wait_for(lambda: not list((tmp_path / "data" / "tmp").iterdir()), 10, "tmp to be empty")
    # /metrics tells the same story, from the rows, the broker and the workers' beats.
    samples = scrape(client)
    assert {kind: value(samples, "sdmerge_jobs", kind=kind, status="succeeded")
            for kind in ("merge", "shard", "preview", "analysis")} == {"merge": 20, "shard": 15, "preview": 4,
                                                                     "analysis": 2}
    assert all(value(samples, "sdmerge_jobs", kind=kind, status=state) == 0 for kind in ("merge", "preview", "analysis")
               for state in ("queued", "running", "failed"))
    assert value(samples, "sdmerge_workers", state="alive") == 3
    assert all(value(samples, "sdmerge_queue_depth", queue=queue) == 0 for queue in ("merge", "hash", "preview"))
    assert value(samples, "sdmerge_merge_written_bytes_total") == sum(path.stat().st_size for path in artifacts)
    assert value(samples, "sdmerge_preview_images_total") == 4
    assert value(samples, "sdmerge_job_duration_seconds_count", kind="merge", status="succeeded") == 20


def test_a_shard_that_finds_bad_input_fails_the_job_with_its_error(client, run_tasks, ready_model, model_root,
                                                                    settings):
    from merge_engine.synthetic import tiny_state_dict, write_checkpoint

    state = tiny_state_dict("sd2", seed=7)
    state["model.diffusion_model.out.2.bias"][0] = float("nan")
    write_checkpoint(model_root / "nan.safetensors", state)
    ready_model("nan.safetensors", "nan")
    ready_model("sd2-1.safetensors", "a")
    job = client.post("/merges", json={"merge": {"method": "uniform", "models": ["a", "nan"]}, "shards": 3}).json()
    run_tasks()
    failed = client.get(f"/merges/{job['id']}").json()
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "non_finite" and failed["shards"] == 3
    assert "model.diffusion_model.out.2.bias" in json.dumps(failed["error"])
    rows = shard_rows(settings.database_url, job["id"])
    bad = [r.index for r in rows if r.status == "failed"]
    assert bad == [failed["error"]["details"]["shard"]], (bad, failed["error"])
    assert {r.status for r in rows if r.index not in bad} <= {"succeeded", "cancelled"}
    assert not list(settings.tmp_dir.iterdir()) and not list(settings.artifact_dir.rglob("*.safetensors"))


def test_a_coordinator_killed_mid_job_is_taken_over_with_its_shards(three_workers, tmp_path):
    """The worker coordinating a sharded job dies: the job's lease lapses, it is sent again, and
    the next attempt goes on with the same shards and shared file; the job completes once."""
    client, _server, workers, database = three_workers
    register(client, SLOW_RECIPE["merge"]["models"])
    job = client.post("/merges", json={**SLOW_RECIPE, "shards": 3}).json()

    def coordinator():
        rows = shard_rows(database, job["id"])
        if not rows or all(r.status == "succeeded" for r in rows):
            return None
        return next((w for w in workers if f"job {job['id']}: split into 3 shards" in w.output()), None)

    victim = wait_for(coordinator, 120, "a worker to be coordinating the job", interval=0.01)
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait()
    done = wait_job(client, job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2 and done["shards"] == 3
    survivors = [w for w in workers if w is not victim]
    assert sum(w.output().count(f"job {job['id']}: going on with its 3 shards") for w in survivors) == 1
    assert sum(w.output().count(f"job {job['id']}: succeeded") for w in survivors) == 1
    assert all(r.status == "succeeded" for r in shard_rows(database, job["id"]))
    one = client.post("/merges", json={**SLOW_RECIPE, "name": "one", "shards": 1}).json()
    one = wait_job(client, one["id"])
    stored = {a["sha256"]: tmp_path / "data" / "artifacts" / a["sha256"][:2] / f"{a['sha256']}.safetensors"
              for a in (done["artifact"], one["artifact"])}
    sharded, whole = (stored[a["sha256"]].read_bytes() for a in (done["artifact"], one["artifact"]))
    data = lambda b: b[8 + int.from_bytes(b[:8], "little"):]  # noqa: E731 - every tensor byte, after the header
    assert data(sharded) == data(whole)
    wait_for(lambda: not list((tmp_path / "data" / "tmp").iterdir()), 10, "the shared partial to go")
