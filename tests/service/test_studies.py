"""A selection study through the API, with the real broker, worker code and preview engine, on
SQLite and PostgreSQL: every round, picks, the final recipe with exact weights, its merge job, the
study in the artifact's metadata, and bad requests answered by name with nothing left over."""

from __future__ import annotations

import json

import pytest
import torch

from tests.service.conftest import data_files
from tests.service.test_analyses import png_size

SETTINGS = {"steps": 3, "width": 64, "height": 64, "seeds": [4]}
CUBE = {"name": "cube", "prompts": ["a red cube"]}
BALL = {"name": "ball", "a1111": {"prompt": "a blue ball", "seed": 9, "steps": 2, "sampler_name": "Euler a",
                                  "cfg_scale": 5, "width": 64, "height": 64}}


@pytest.fixture
def sd2_models(ready_model):
    return {name: ready_model(f"sd2-{seed}.safetensors", name) for seed, name in ((1, "a"), (2, "b"), (3, "c"),
                                                                                (4, "d"))}


def finish_round(client, run_tasks, study_id: int, kind: str) -> dict:
    started = client.post(f"/studies/{study_id}/rounds", json={"kind": kind})
    assert started.status_code == 202, started.text
    assert run_tasks() == ["sdmerge.preview"]
    done = client.get(f"/studies/{study_id}/rounds/{started.json()['number']}").json()
    assert done["status"] == "succeeded", client.get(f"/previews/{done['preview']}").json()
    return done


def leaf(model: dict) -> dict:
    return {"sha256": model["sha256"], "name": model["name"]}


def test_a_study_from_the_blind_merge_to_the_merged_picks(client, run_tasks, sd2_models, settings):
    m = sd2_models
    created = client.post("/studies", json={"name": "astolfo", "candidates": ["a", "b", m["c"]["id"], "d"],
                                            "topics": [CUBE, BALL], **SETTINGS})
    assert created.status_code == 201, created.text
    study = created.json()
    sid = study["id"]
    assert [c["name"] for c in study["candidates"]] == ["a", "b", "c", "d"] and study["architecture"] == "sd2"
    assert study["rounds"] == [] and study["final_recipe"]["merge"]["method"] == "uniform"

    raw = finish_round(client, run_tasks, sid, "raw")
    assert [c["label"] for c in raw["columns"]] == ["all 4", "a", "b", "c", "d"]
    assert [c["candidate"] for c in raw["columns"]] == [None, "a", "b", "c", "d"]
    preview = client.get(f"/previews/{raw['preview']}").json()
    assert len(preview["images"]) == 5 * 2  # one column per candidate, a row per topic
    assert "Sampler: Euler a" in preview["images"][1]["infotext"] and "Seed: 4" in preview["images"][0]["infotext"]
    grid = client.get(raw["grid"])
    assert grid.status_code == 200 and png_size(grid.content)[0] > 5 * 64

    te = finish_round(client, run_tasks, sid, "text_encoder")
    assert [c["label"] for c in te["columns"]] == ["TE: a", "TE: b", "TE: c", "TE: d"]
    assert te["base"]["merge"]["models"] == [leaf(m[n]) for n in "abcd"]  # the blind merge, never written
    picked = client.post(f"/studies/{sid}/rounds/{te['number']}/picks", json={"picks": ["b", m["d"]["id"]]})
    assert picked.status_code == 200, picked.text
    assert picked.json()["picks"] == ["b", "d"]

    unet = finish_round(client, run_tasks, sid, "unet")
    assert unet["base"]["components"]["text_encoder"] == {"method": "uniform", "models": [leaf(m["b"]), leaf(m["d"])]}
    assert [c["label"] for c in unet["columns"]] == ["UNet: a", "UNet: b", "UNet: c", "UNet: d"]
    unet_preview = client.get(f"/previews/{unet['preview']}").json()
    assert unet_preview["targets"][2]["recipe"]["components"]["unet"]["sha256"] == m["c"]["sha256"]
    assert client.post(f"/studies/{sid}/rounds/{unet['number']}/picks", json={"picks": ["a", "b", "c"]}).status_code == 200

    # a round built from the text-encoder picks freezes them
    again = client.post(f"/studies/{sid}/rounds/{te['number']}/picks", json={"picks": ["a"]})
    assert again.status_code == 409 and "start a new text_encoder round" in again.json()["error"]["message"]

    loo = finish_round(client, run_tasks, sid, "leave_one_out")
    assert [c["label"] for c in loo["columns"]] == ["all 3", "without a", "without b", "without c"]
    loo_preview = client.get(f"/previews/{loo['preview']}").json()
    assert all(t["recipe"]["output"]["accumulate"] == "fp64" for t in loo_preview["targets"])
    assert client.post(f"/studies/{sid}/rounds/{loo['number']}/picks", json={"picks": ["c"]}).status_code == 200

    final = finish_round(client, run_tasks, sid, "final")
    assert [c["label"] for c in final["columns"]] == ["final"]
    bad = client.post(f"/studies/{sid}/rounds/{final['number']}/picks", json={"picks": ["a"]})
    assert bad.status_code == 422 and "merge it" in bad.json()["error"]["message"]

    study = client.get(f"/studies/{sid}").json()
    assert study["selection"] == {"kept": ["a", "b", "c", "d"], "text_encoders": ["b", "d"], "unets": ["a", "b"],
                                  "left_out": ["c"]}
    assert study["final_recipe"] == {"name": "astolfo", "merge": {"method": "uniform", "models": [leaf(m["a"]), leaf(m["b"])]},
                                     "components": {"text_encoder": {"method": "uniform",
                                                                     "models": [leaf(m["b"]), leaf(m["d"])]}}}

    merged = client.post(f"/studies/{sid}/merge")
    assert merged.status_code == 202, merged.text
    job = merged.json()
    run_tasks()
    job = client.get(f"/merges/{job['id']}").json()
    assert job["status"] == "succeeded", job
    assert client.get(f"/studies/{sid}").json()["merge"] == job["id"]
    assert client.post(f"/studies/{sid}/merge").status_code == 200  # the same recipe: the same job

    # the artifact records the study: rounds, candidates and picks
    metadata = client.get(f"/artifacts/{job['artifact']['id']}/metadata").json()
    record = json.loads(metadata["sdmerge_study"])
    assert record["study"] == sid and record["name"] == "astolfo"
    assert [c["name"] for c in record["candidates"]] == ["a", "b", "c", "d"]
    assert [(r["kind"], r["picks"]) for r in record["rounds"]] == [
        ("raw", None), ("text_encoder", ["b", "d"]), ("unet", ["a", "b", "c"]), ("leave_one_out", ["c"]),
        ("final", None)]
    assert record["rounds"][1]["columns"] == ["TE: a", "TE: b", "TE: c", "TE: d"]
    assert record["selection"]["unets"] == ["a", "b"] and record["topics"][1]["prompts"] == ["a blue ball"]

    # exact weights: 1/2 each, summed in fp32 and rounded once
    from safetensors.torch import load_file

    from app.services.files import artifact_path

    out = load_file(artifact_path(settings, job["artifact"]["sha256"]))
    root = settings.model_roots[0]
    inputs = {n: load_file(root / f"sd2-{s}.safetensors") for n, s in (("a", 1), ("b", 2), ("d", 4))}
    for key, sources in (("model.diffusion_model.out.2.weight", "ab"),
                         ("cond_stage_model.model.token_embedding.weight", "bd"),
                         ("first_stage_model.decoder.conv_out.weight", "ab")):
        expected = (inputs[sources[0]][key].float() * 0.5 + inputs[sources[1]][key].float() * 0.5).half()
        assert torch.equal(out[key], expected), key
    assert not [f for f in data_files(settings) if f.startswith("tmp/")]


def test_a_baked_vae_and_sdxl_text_encoders(client, run_tasks, ready_model):
    models = [ready_model(f"sdxl-{seed}.safetensors", f"x{seed}") for seed in (1, 2, 3)]
    study = client.post("/studies", json={"candidates": ["x1", "x2"], "vae": "x3", "prompts": ["a cat"],
                                          **SETTINGS}).json()
    assert study["vae"]["name"] == "x3", study
    final = study["final_recipe"]
    assert set(final["components"]) == {"text_encoder", "text_encoder_2", "vae"}
    assert final["components"]["vae"]["name"] == "x3"
    te = client.post(f"/studies/{study['id']}/rounds", json={"kind": "text_encoder"}).json()
    targets = client.get(f"/previews/{te['preview']}").json()["targets"]
    assert all(t["recipe"]["components"]["vae"]["sha256"] == models[2]["sha256"] for t in targets)
    assert {"text_encoder", "text_encoder_2"} <= set(targets[0]["recipe"]["components"])
    run_tasks()


@pytest.mark.parametrize(("body", "needle"), [
    ({"candidates": ["a"]}, "candidates"),
    ({"candidates": ["a", "a"]}, "listed twice"),
    ({"candidates": ["a", "nope"]}, "nope"),
    ({"candidates": ["a", "sd1"]}, "different architectures"),
    ({"candidates": ["a", "b"], "prompts": []}, "at least one prompt"),
    ({"candidates": ["a", "b"], "steps": 0}, "steps must be between"),
    ({"candidates": ["a", "b"], "topics": [{"a1111": {"prompt": "x", "restore_faces": True}}]}, "restore_faces"),
])
def test_bad_studies_are_refused_by_name(client, ready_model, settings, body, needle):
    for filename, name in (("sd2-1.safetensors", "a"), ("sd2-2.safetensors", "b"), ("sd1-1.safetensors", "sd1")):
        ready_model(filename, name)
    response = client.post("/studies", json={**({} if "topics" in body else {"prompts": ["x"]}), **body})
    assert response.status_code == 422, response.text
    assert needle in response.json()["error"]["message"] or needle in response.text
    assert client.get("/studies").json()["items"] == [] and data_files(settings) == []


def test_bad_rounds_and_picks(client, run_tasks, sd2_models):
    sid = client.post("/studies", json={"candidates": ["a", "b", "c"], "prompts": ["x"], **SETTINGS}).json()["id"]
    assert client.post(f"/studies/{sid}/rounds", json={"kind": "blocks"}).status_code == 422
    assert client.post("/studies/999/rounds", json={"kind": "raw"}).status_code == 404
    started = client.post(f"/studies/{sid}/rounds", json={"kind": "unet"}).json()
    early = client.post(f"/studies/{sid}/rounds/1/picks", json={"picks": ["a"]})
    assert early.status_code == 409 and "queued" in early.json()["error"]["message"]
    run_tasks()
    assert client.get(f"/studies/{sid}/rounds/{started['number']}").json()["status"] == "succeeded"
    for picks, needle in ((["d"], "not a candidate of this unet round"), ([], "pick at least one")):
        response = client.post(f"/studies/{sid}/rounds/1/picks", json={"picks": picks})
        assert response.status_code == 422 and needle in response.json()["error"]["message"], response.text
    assert client.get(f"/studies/{sid}/rounds/2").status_code == 404
    assert client.post(f"/studies/{sid}/rounds/1/picks", json={"picks": ["a"]}).status_code == 200
    loo = client.post(f"/studies/{sid}/rounds", json={"kind": "leave_one_out"})
    assert loo.status_code == 422 and "at least 2 UNets" in loo.json()["error"]["message"]
    assert client.get(f"/studies/{sid}").json()["rounds"][0]["picks"] == ["a"]
