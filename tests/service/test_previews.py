"""Preview jobs through the API with the real worker code and the real preview engine, on tiny
SD2 checkpoints at 64x64 and 4 steps: models, merge outputs, recipes, text-encoder sweeps,
bad requests, cancel."""

from __future__ import annotations

import pytest

from tests.service.conftest import data_files
from tests.service.test_analyses import PNG_SIGNATURE, png_size

TINY = {"prompts": ["a red cube"], "seeds": [1], "steps": 4, "width": 64, "height": 64}


@pytest.fixture
def sd2_models(ready_model):
    return [ready_model(f"sd2-{seed}.safetensors", name) for seed, name in ((1, "a"), (2, "b"), (3, "c"))]


def preview_queue_size(runtime) -> int:
    with runtime.celery.connection_for_read() as connection:
        queue = connection.SimpleQueue("preview")
        try:
            return queue.qsize()
        finally:
            queue.close()


def test_preview_of_a_model_a_merge_and_a_recipe(client, run_tasks, runtime, sd2_models, settings):
    a, b, _ = sd2_models
    merge = client.post("/merges", json={"merge": {"method": "uniform", "models": ["a", "b"]}}).json()
    run_tasks()
    body = {**TINY, "targets": ["a", {"merge": merge["id"]},
                                {"recipe": {"name": "mix", "merge": {"method": "uniform", "models": ["a", "c"]}}}]}
    response = client.post("/previews", json=body)
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["status"] == "queued" and queued["progress"] == {"images_done": 0, "images_total": 3}
    assert [t["label"] for t in queued["targets"]] == ["a", f"merge #{merge['id']}", "mix"]
    assert queued["targets"][1]["recipe"]["merge"]["sha256"] == client.get(f"/merges/{merge['id']}").json()["artifact"]["sha256"]
    assert preview_queue_size(runtime) == 1  # routed to the preview queue
    assert run_tasks() == ["sdmerge.preview"]

    done = client.get(f"/previews/{queued['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"images_done": 3, "images_total": 3}
    assert [(i["index"], i["target_index"], i["seed"]) for i in done["images"]] == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    assert f"Model hash: {a['sha256'][:10]}, Model: a" in done["images"][0]["infotext"]
    for image in done["images"]:
        got = client.get(image["url"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert png_size(got.content) == (64, 64)
        assert image["infotext"].encode() in got.content  # the PNG's `parameters` chunk
    grid = client.get(done["grid"])
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    width, height = png_size(grid.content)
    assert width > 3 * 64 and height > 64
    assert client.get(f"/previews/{queued['id']}/images/3.png").status_code == 404

    # The service renders what the engine renders for the same target and sampling.
    from merge_engine.preview.render import Sampling, Target, render_previews
    from merge_engine.recipe import Recipe
    from merge_engine.resolve import FileResolver

    direct = render_previews([Target("a", Recipe(merge="sd2-1.safetensors"), FileResolver(settings.model_roots[0]), "a")],
                             Sampling(prompts=("a red cube",), seeds=(1,), steps=4, width=64, height=64),
                             settings.data_dir / "direct", device="cpu")
    assert direct.images[0].path.read_bytes() == client.get(done["images"][0]["url"]).content

    previews = [f for f in data_files(settings) if "previews" in f]
    assert sorted(previews) == [f"artifacts/previews/{queued['id']}/{name}" for name in
                                ("grid.png", "images/0.png", "images/1.png", "images/2.png")]
    assert not [f for f in data_files(settings) if f.startswith("tmp/")]


def test_text_encoder_sweep_makes_one_target_per_candidate(client, run_tasks, sd2_models):
    a, b, c = sd2_models
    body = {**TINY, "prompts": ["a red cube", "a blue ball"], "base": "a", "swap_text_encoder_from": ["b", c["id"]]}
    response = client.post("/previews", json=body)
    assert response.status_code == 202, response.text
    targets = response.json()["targets"]
    assert [t["label"] for t in targets] == ["TE: b", "TE: c"]
    assert [t["recipe"]["components"]["text_encoder"]["sha256"] for t in targets] == [b["sha256"], c["sha256"]]
    assert all(t["recipe"]["merge"]["sha256"] == a["sha256"] for t in targets)
    run_tasks()
    done = client.get(f"/previews/{response.json()['id']}").json()
    assert done["status"] == "succeeded", done
    assert len(done["images"]) == 4 and done["grid"] is not None
    assert [(i["target_index"], i["prompt_index"]) for i in done["images"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "Model: a + TE b" in done["images"][0]["infotext"]
    first = client.get(done["images"][0]["url"]).content
    assert first[:8] == PNG_SIGNATURE and png_size(first) == (64, 64)


@pytest.mark.parametrize(("change", "status", "code", "needle"), [
    ({"targets": ["a", "nope"]}, 422, "unknown_model", "nope"),
    ({"sampler": "ddim"}, 422, "invalid_options", "unknown sampler 'ddim'"),
    ({"width": 60}, 422, "invalid_options", "width must be a multiple of 8"),
    ({"prompts": []}, 422, "invalid_options", "at least one prompt"),
    ({"steps": 0}, 422, "invalid_options", "steps must be between"),
    ({"prediction_type": "x0"}, 422, "invalid_options", "unknown prediction_type"),
    ({"targets": []}, 422, "invalid_preview", "at least one target"),
    ({"targets": [{"model": "a"}]}, 422, "invalid_preview", "targets[0] must be"),
    ({"targets": [{"merge": 99}]}, 422, "invalid_preview", "no merge job #99"),
    ({"targets": [{"recipe": {"merge": {"method": "uniform", "models": []}}}]}, 422, "invalid_recipe", "merge"),
    ({"targets": [], "base": "a", "swap_text_encoder_from": ["sd1"]}, 422, "architecture_mismatch", "sd1"),
    ({"targets": [], "swap_text_encoder_from": ["b"]}, 422, "invalid_preview", "needs a base"),
    ({"colour": "red"}, 422, "invalid_request", "colour"),
])
def test_bad_requests_are_clear_and_leave_nothing(client, ready_model, settings, change, status, code, needle):
    for filename, name in (("sd2-1.safetensors", "a"), ("sd2-2.safetensors", "b"), ("sd1-1.safetensors", "sd1")):
        ready_model(filename, name)
    response = client.post("/previews", json={**TINY, "targets": ["a"], **change})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and needle in error["message"], error
    assert client.get("/previews").json()["items"] == []
    assert data_files(settings) == []


def test_a_merge_that_has_not_finished_cannot_be_previewed(client, sd2_models):
    merge = client.post("/merges", json={"merge": {"method": "uniform", "models": ["a", "b"]}}).json()
    response = client.post("/previews", json={**TINY, "targets": [{"merge": merge["id"]}]})
    assert response.status_code == 409 and "queued" in response.json()["error"]["message"]


def test_cancel_queued_and_running_previews(client, run_tasks, runtime, sd2_models, settings):
    from app.models import Preview
    from worker.lease import claim, new_owner
    from worker.previews import run_preview

    queued = client.post("/previews", json={**TINY, "targets": ["a"]}).json()
    cancelled = client.delete(f"/previews/{queued['id']}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert run_tasks() == ["sdmerge.preview"]  # delivered, and nothing runs
    assert client.get(f"/previews/{queued['id']}").json()["attempts"] == 0
    assert client.get(f"/previews/{queued['id']}/grid.png").status_code == 404

    running = client.post("/previews", json={**TINY, "targets": ["a", "b"]}).json()
    owner = new_owner()
    assert claim(runtime, Preview, running["id"], owner)
    flagged = client.post(f"/previews/{running['id']}/cancel")
    assert flagged.status_code == 202 and flagged.json()["cancel_requested"]
    assert run_preview(runtime, running["id"], owner) == "cancelled"
    after = client.get(f"/previews/{running['id']}").json()
    assert after["status"] == "cancelled" and after["images"] == [] and after["grid"] is None
    assert data_files(settings) == []
    assert client.delete(f"/previews/{running['id']}").status_code == 204
    assert client.get(f"/previews/{running['id']}").status_code == 404
    run_tasks()


def test_webui_settings_an_a1111_payload_and_a_decode_vae(client, run_tasks, sd2_models):
    """The settings model makers use, through the API: a txt2img payload with hires fix, clip skip,
    FreeU and dynamic thresholding, seeds overridden beside it, decoded with another model's VAE."""
    payload = {"prompt": "a red cube", "negative_prompt": "blurry", "seed": 5, "steps": 3, "cfg_scale": 6,
               "sampler_name": "Euler", "width": 64, "height": 64, "enable_hr": True, "hr_scale": 1.5,
               "hr_upscaler": "Latent", "hr_second_pass_steps": 2, "denoising_strength": 0.7,
               "override_settings": {"CLIP_stop_at_last_layers": 2},
               "alwayson_scripts": {"Dynamic Thresholding (CFG Scale Fix)": {
                   "args": [True, 1, 100, "Constant", 0, "Constant", 0, 4, True, "MEAN", "AD", 0.3]},
                   "FreeU": {"args": [True, 0.0, 1.0, 0.0, "2", 1.1, 0.9, 0, 0.5, 0, 1]}}}
    response = client.post("/previews", json={"targets": ["a"], "a1111": payload, "seeds": [5, 6], "vae": "b"})
    assert response.status_code == 202, response.text
    run_tasks()
    done = client.get(f"/previews/{response.json()['id']}").json()
    assert done["status"] == "succeeded", done
    assert len(done["images"]) == 2 and done["sampling"]["hires"]["scale"] == 1.5
    text = done["images"][0]["infotext"]
    for fragment in ("Steps: 3, Sampler: Euler, CFG scale: 6, Seed: 5, Size: 64x64", "VAE hash: ",
                     "VAE: sd2-2.safetensors", "Denoising strength: 0.7, Clip skip: 2, RNG: CPU",
                     "FreeU Version: 2, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent",
                     "Dynamic thresholding enabled: True, Mimic scale: 1"):
        assert fragment in text, (fragment, text)
    assert png_size(client.get(done["images"][0]["url"]).content) == (96, 96)
    refused = client.post("/previews", json={"targets": ["a"], "a1111": {**payload, "restore_faces": True}})
    assert refused.status_code == 422 and "restore_faces" in refused.json()["error"]["message"]
    pasted = client.post("/previews", json={"targets": ["a"], "infotext": text})
    assert pasted.status_code == 202, pasted.text
    assert pasted.json()["sampling"]["dynamic_thresholding"]["interpolate_phi"] == 0.3


def test_sweeps_over_a_finished_merge_with_topics(client, run_tasks, runtime, sd2_models, settings):
    """A leave-one-out of a merge job's own recipe and an XY table, with two topics: the cells are
    the recipes that were asked for, the grid has one column per x, and a cell's pixels are those
    the engine renders for the same recipe."""
    a, b, c = sd2_models
    merge = client.post("/merges", json={"name": "soup", "merge": {"method": "uniform", "models": ["a", "b", "c"]}}).json()
    topics = [{"name": "cube", "prompts": ["a red cube"]},
              {"name": "ball", "infotext": "a blue ball\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 8, Size: 64x64"}]
    body = {"steps": 3, "width": 64, "height": 64, "topics": topics,
            "sweep": {"kind": "leave_one_out", "base": {"merge": merge["id"]}}}
    response = client.post("/previews", json=body)  # the merge has not run: its recipe is enough
    assert response.status_code == 202, response.text
    queued = response.json()
    assert [t["label"] for t in queued["targets"]] == ["all 3", "without a", "without b", "without c"]
    assert all(t["recipe"]["output"]["accumulate"] == "fp64" for t in queued["targets"])
    assert [m["sha256"] for m in queued["targets"][2]["recipe"]["merge"]["models"]] == [a["sha256"], c["sha256"]]
    assert queued["targets"][1]["source"] == {"sweep": {"x": {"without": "a", "index": 0}}}
    # the fields beside the topics apply to them all, but what a topic's own infotext sets wins over
    # nothing: steps 3 is given beside, so the infotext's steps 2 gives way
    assert [t["steps"] for t in queued["topics"]] == [3, 3] and queued["topics"][1]["seeds"] == [8]
    assert queued["progress"]["images_total"] == 8
    run_tasks()
    done = client.get(f"/previews/{queued['id']}").json()
    assert done["status"] == "succeeded", done
    assert [(i["target_index"], i["topic_index"]) for i in done["images"][:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]

    from merge_engine.preview.render import Sampling, Target, render_previews
    from merge_engine.recipe import parse_recipe
    from worker.jobs import registry_resolver

    cell = queued["targets"][3]
    direct = render_previews([Target(cell["label"], parse_recipe(cell["recipe"]), registry_resolver(runtime),
                                     cell["model_name"])],
                             Sampling(prompts=("a blue ball",), seeds=(8,), steps=3, cfg_scale=5, width=64, height=64),
                             settings.data_dir / "direct", device="cpu")
    assert direct.images[0].path.read_bytes() == client.get(done["images"][7]["url"]).content

    xy = client.post("/previews", json={**TINY, "sweep": {
        "base": {"recipe": {"merge": {"method": "uniform", "models": ["a", "b", "c"]}}},
        "x": {"kind": "text_encoder", "candidates": ["a", {"merge": merge["id"]}]},
        "y": {"kind": "weight", "path": "merge.models.0.weight", "values": [0.5, 2]}}})
    assert xy.status_code == 422 and "uniform merge" in xy.json()["error"]["message"]
    xy = client.post("/previews", json={**TINY, "sweep": {
        "base": {"recipe": {"merge": {"method": "weighted", "models": ["a", "b", "c"]}}},
        "x": {"kind": "text_encoder", "candidates": ["a", {"merge": merge["id"]}]},
        "y": {"kind": "weight", "path": "merge.models.0.weight", "values": [0.5, 2]}}})
    assert xy.status_code == 202, xy.text
    table = xy.json()
    assert table["grid_rows"] == ["merge.models.0.weight = 0.5", "merge.models.0.weight = 2"]
    assert [t["label"] for t in table["targets"]] == ["TE: a", "TE: soup"] * 2
    assert table["targets"][3]["recipe"]["merge"]["models"][0]["weight"] == 2
    run_tasks()
    assert client.get(f"/previews/{table['id']}").json()["status"] == "succeeded"


@pytest.mark.parametrize(("sweep", "needle"), [
    ({"kind": "leave_one_out", "base": "a"}, "uniform or weighted merge"),
    ({"kind": "unet", "base": "a", "candidates": ["nope"]}, "nope"),
    ({"kind": "unet", "base": {"merge": 999}, "candidates": ["a"]}, "no merge job #999"),
    ({"kind": "vae", "base": ["a"], "candidates": ["b"]}, "sweep.base must be"),
    ({"kind": "zoom", "base": "a"}, "x.kind"),
])
def test_bad_sweeps_are_clear_and_leave_nothing(client, sd2_models, settings, sweep, needle):
    response = client.post("/previews", json={**TINY, "sweep": sweep})
    assert response.status_code == 422, response.text
    assert needle in response.json()["error"]["message"]
    assert client.get("/previews").json()["items"] == [] and data_files(settings) == []
    both = client.post("/previews", json={**TINY, "targets": ["a"], "sweep": {"kind": "vae", "base": "a",
                                                                              "candidates": ["b"]}})
    assert both.status_code == 422 and "not both" in both.json()["error"]["message"]
