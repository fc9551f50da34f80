"""Merge jobs through the API with the real worker code: submit, run, dedupe, cancel, download."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.service.conftest import SLOW_RECIPE, SLOW_SEEDS, data_files


def uniform(*names: str, **extra) -> dict:
    return {"merge": {"method": "uniform", "models": list(names)}, **extra}


@pytest.fixture
def two_models(ready_model):
    return ready_model("sd2-1.safetensors", "a"), ready_model("sd2-2.safetensors", "b")


def test_submit_run_and_download(client, run_tasks, two_models, settings):
    response = client.post("/merges", json=uniform("a", "b", name="soup"))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["artifact"] is None
    assert job["architecture"] == "sd2" and job["output_size"] > 0
    leaves = job["recipe"]["merge"]["models"]
    assert [leaf["sha256"] for leaf in leaves] == [m["sha256"] for m in two_models]
    assert run_tasks() == ["sdmerge.merge"]
    job = client.get(f"/merges/{job['id']}").json()
    assert job["status"] == "succeeded", job
    assert job["progress"]["tensors_done"] == job["progress"]["tensors_total"] > 0
    artifact = job["artifact"]
    download = client.get(artifact["url"])
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == artifact["sha256"]
    assert len(download.content) == artifact["size"] == job["output_size"]
    assert download.headers["etag"] == f'"{artifact["sha256"]}"'
    assert 'filename="soup.safetensors"' in download.headers["content-disposition"]
    metadata = client.get(f"/artifacts/{artifact['id']}/metadata").json()
    assert json.loads(metadata["sdmerge_recipe"]) == job["recipe"]
    # The ModelSpec hash sealed into the header is the AutoV3 of the bytes served, and the stored
    # metadata is the file's own (the hash filled in).
    data_start = 8 + int.from_bytes(download.content[:8], "little")
    assert metadata["modelspec.hash_sha256"] == "0x" + hashlib.sha256(download.content[data_start:]).hexdigest()
    assert json.loads(download.content[8:data_start])["__metadata__"] == metadata
    assert metadata["modelspec.title"] == "soup"
    assert data_files(settings) == [f"artifacts/{artifact['sha256'][:2]}/{artifact['sha256']}.safetensors"]


def test_range_etag_and_head(client, run_tasks, two_models):
    job = client.post("/merges", json=uniform("a", "b")).json()
    run_tasks()
    artifact = client.get(f"/merges/{job['id']}").json()["artifact"]
    url, size, etag = artifact["url"], artifact["size"], f'"{artifact["sha256"]}"'
    whole = client.get(url).content
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{size}"
    tail = client.get(url, headers={"Range": f"bytes={size - 10}-"})
    assert tail.status_code == 206 and tail.content == whole[-10:]
    assert client.get(url, headers={"Range": f"bytes={size}-"}).status_code == 416
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    head = client.head(url)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == size
    resumed = client.get(url, headers={"Range": "bytes=100-", "If-Range": etag})
    assert resumed.status_code == 206 and resumed.content == whole[100:]


def test_resubmission_returns_the_same_job_until_it_fails_or_is_cancelled(client, run_tasks, two_models):
    first = client.post("/merges", json=uniform("a", "b"))
    by_other_refs = uniform("sha256:" + two_models[0]["sha256"][:12], str(two_models[1]["id"]))
    again = client.post("/merges", json=by_other_refs)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    run_tasks()
    done = client.post("/merges", json=uniform("a", "b"))
    assert done.status_code == 200 and done.json()["status"] == "succeeded"
    other_dtype = client.post("/merges", json=uniform("a", "b", output={"dtype": "fp32"}))
    assert other_dtype.status_code == 202
    assert client.post(f"/merges/{other_dtype.json()['id']}/cancel").json()["status"] == "cancelled"
    retry = client.post("/merges", json=uniform("a", "b", output={"dtype": "fp32"}))
    assert retry.status_code == 202 and retry.json()["id"] != other_dtype.json()["id"]


def test_concurrent_identical_submissions_make_one_job(client, two_models):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post("/merges", json=uniform("a", "b")), range(8)))
    assert sorted(a.status_code for a in answers) == [200] * 7 + [202]
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(client.get("/merges").json()["items"]) == 1


def test_cancel_running_job_stops_it_and_leaves_no_file(client, ready_model, runtime, settings):
    from app.models import Job
    from worker.jobs import run_merge_job
    from worker.lease import claim, new_owner

    for seed in SLOW_SEEDS:
        ready_model(f"sdxl-{seed}.safetensors")
    job = client.post("/merges", json=SLOW_RECIPE).json()
    owner = new_owner()
    assert claim(runtime, Job, job["id"], owner)  # the job is running: a cancel only raises its flag
    cancelled = client.post(f"/merges/{job['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "running"
    assert run_merge_job(runtime, job["id"], owner) == "cancelled"
    job = client.get(f"/merges/{job['id']}").json()
    assert job["status"] == "cancelled" and job["artifact"] is None
    assert data_files(settings) == []
    assert client.post(f"/merges/{job['id']}/cancel").status_code == 409


def test_a_finished_job_is_not_run_again(client, run_tasks, runtime, two_models):
    from worker.jobs import run_merge_job

    job = client.post("/merges", json=uniform("a", "b")).json()
    run_tasks()
    assert run_merge_job(runtime, job["id"]) is None
    assert client.get(f"/merges/{job['id']}").json()["attempts"] == 1


def test_plan_is_a_dry_run(client, two_models):
    response = client.post("/merges/plan", json=uniform("a", "b"))
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["architecture"] == "sd2" and plan["output"]["bytes"] > 0
    assert client.get("/merges").json()["items"] == []


def test_list_pages_newest_first(client, two_models):
    ids = [client.post("/merges", json=uniform("a", "b", output={"dtype": d})).json()["id"]
           for d in ("fp16", "fp32", "bf16")]
    page = client.get("/merges", params={"limit": 2}).json()
    assert [j["id"] for j in page["items"]] == ids[:0:-1]
    rest = client.get("/merges", params={"limit": 2, "cursor": page["next"]}).json()
    assert [j["id"] for j in rest["items"]] == ids[:1] and rest["next"] is None
    assert client.get("/merges", params={"status": "succeeded"}).json()["items"] == []


def test_a1111_metadata_is_converted_and_resolved_by_sha256(client, run_tasks, two_models):
    a, b = two_models
    metadata = {"__metadata__": {
        "sd_merge_recipe": json.dumps({
            "type": "webui", "primary_model_hash": a["sha256"], "secondary_model_hash": b["sha256"],
            "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.25,
            "save_as_half": True, "custom_name": "webui-mix", "config_source": 0, "bake_in_vae": "None",
            "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}),
        "sd_merge_models": json.dumps({
            a["sha256"]: {"name": "elsewhere-a.safetensors", "legacy_hash": a["legacy_hash"], "sd_merge_recipe": None},
            b["sha256"]: {"name": "elsewhere-b.safetensors", "legacy_hash": b["legacy_hash"], "sd_merge_recipe": None},
        }),
    }}
    response = client.post("/merges", json=metadata)
    assert response.status_code == 202, response.text
    weights = {m["model"]["sha256"]: m["weight"] for m in response.json()["recipe"]["merge"]["models"]}
    assert weights == {a["sha256"]: 0.75, b["sha256"]: 0.25}
    run_tasks()
    assert client.get(f"/merges/{response.json()['id']}").json()["status"] == "succeeded"


def test_a1111_unresolved_leaves_are_listed(client, two_models):
    with open("/work/shared/seed-recipes/recipe-209.json") as f:
        seed = json.load(f)
    response = client.post("/merges", json=seed)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unknown_model"
    assert len(error["details"]["unresolved"]) > 1
    assert client.get("/merges").json()["items"] == []


def test_delete_artifact_then_resubmit_merges_again(client, run_tasks, two_models, settings):
    job = client.post("/merges", json=uniform("a", "b")).json()
    run_tasks()
    artifact = client.get(f"/merges/{job['id']}").json()["artifact"]
    assert client.delete(f"/artifacts/{artifact['id']}").status_code == 204
    assert client.get(artifact["url"]).status_code == 404
    assert data_files(settings) == []
    again = client.post("/merges", json=uniform("a", "b"))
    assert again.status_code == 202 and again.json()["id"] != job["id"]


def test_reaper_resends_lost_messages_and_requeues_lapsed_leases(client, run_tasks, runtime, two_models):
    from datetime import timedelta

    from sqlalchemy import update

    from app.models import Job, utcnow
    from worker.lease import claim
    from worker.reaper import reap

    lost = client.post("/merges", json=uniform("a", "b")).json()
    crashed = client.post("/merges", json=uniform("a", "b", output={"dtype": "fp32"})).json()
    # The broker lost both messages; one job was also claimed by a worker that then died.
    with runtime.celery.connection_for_read() as connection:
        connection.SimpleQueue("merge").clear()
    assert claim(runtime, Job, crashed["id"], "deadbeefdeadbeef")
    long_ago = utcnow() - timedelta(hours=1)
    with runtime.sessions.begin() as session:
        session.execute(update(Job).values(dispatched_at=long_ago))
        session.execute(update(Job).where(Job.id == crashed["id"]).values(lease_expires_at=long_ago))
    report = reap(runtime)
    assert report["resent"] == [lost["id"]] and report["requeued"] == [crashed["id"]]
    assert reap(runtime)["resent"] == []  # sent once, not on every pass
    assert sorted(run_tasks()) == ["sdmerge.merge", "sdmerge.merge"]
    for job in (lost, crashed):
        assert client.get(f"/merges/{job['id']}").json()["status"] == "succeeded"
    assert client.get(f"/merges/{crashed['id']}").json()["attempts"] == 2


def test_a_ties_unet_with_a_uniform_text_encoder_through_the_api(client, run_tasks, ready_model):
    for seed, name in ((1, "base"), (2, "b"), (3, "c")):
        ready_model(f"sd2-{seed}.safetensors", name)
    recipe = {"name": "ties-mix",
              "merge": {"method": "ties", "base": "base", "models": ["b", "c"], "k": 0.5, "vote_sgn": True},
              "components": {"text_encoder": {"method": "uniform", "models": ["b", "c"]}}}
    planned = client.post("/merges/plan", json=recipe)
    assert planned.status_code == 200, planned.text
    assert planned.json()["components"]["unet"]["evaluation"]["method"] == "ties"
    job = client.post("/merges", json=recipe).json()
    assert run_tasks() == ["sdmerge.merge"]
    job = client.get(f"/merges/{job['id']}").json()
    assert job["status"] == "succeeded", job
    metadata = client.get(f"/artifacts/{job['artifact']['id']}/metadata").json()
    stored = json.loads(metadata["sdmerge_recipe"])
    assert stored["merge"]["method"] == "ties" and stored["merge"]["k"] == 0.5
    assert stored["components"]["text_encoder"]["method"] == "uniform"


@pytest.mark.parametrize("body,field", [
    ({"method": "ties", "base": "a", "models": ["b"], "k": 1.5}, "merge.ties.k"),
    ({"method": "dare", "base": "a", "models": ["b"], "probability": -1}, "merge.dare.probability"),
    ({"method": "geometric_median", "models": ["a"], "maxiter": -3}, "merge.geometric_median.maxiter"),
])
def test_a_method_parameter_out_of_range_is_a_422_naming_method_and_field(client, body, field):
    response = client.post("/merges", json={"merge": body})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_recipe" and field in error["message"]


def test_a_lora_registers_and_bakes_through_the_api(client, run_tasks, ready_model, model_root):
    from safetensors.torch import load, load_file

    from tests.test_lora import KOHYA_SD2, U, write_lora

    base = ready_model("sd2-1.safetensors", "base")
    model = load_file(model_root / "sd2-1.safetensors")
    deltas = write_lora(model_root / "style.safetensors", model, KOHYA_SD2)
    lora = ready_model("style.safetensors", "style")
    assert lora["architecture"] is None and lora["components"] == {}
    recipe = {"merge": {"method": "lora", "model": "base", "loras": [{"lora": "style", "strength": 0.5}]},
              "output": {"dtype": "fp32", "accumulate": "fp64"}}
    planned = client.post("/merges/plan", json=recipe)
    assert planned.status_code == 200, planned.text
    assert planned.json()["loras"]["style"]["unmatched"] == 0
    job = client.post("/merges", json=recipe).json()
    assert job["recipe"]["merge"]["loras"][0]["lora"] == {"sha256": lora["sha256"], "name": "style.safetensors"}
    assert job["recipe"]["merge"]["model"]["sha256"] == base["sha256"]
    run_tasks()
    job = client.get(f"/merges/{job['id']}").json()
    assert job["status"] == "succeeded", job
    out = load(client.get(job["artifact"]["url"]).content)
    key = U + "output_blocks.5.1.proj_out.weight"
    assert torch_close(out[key], model[key].double() + 0.5 * deltas[key])
    bad = client.post("/merges", json={"merge": {"method": "lora", "model": "base", "loras": [{"lora": "nowhere"}]}})
    assert bad.status_code == 422 and "nowhere" in bad.text


def torch_close(a, b) -> bool:
    import torch

    return bool(torch.allclose(a.double(), b, rtol=1e-6, atol=1e-6))
