"""Weight analyses through the API with the real worker code: figures equal to the engine's,
real PNGs, clear 4xx for bad requests, cancel, delete, and the reaper."""

from __future__ import annotations

import json
import struct

import pytest

from tests.service.conftest import data_files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def sd2_models(ready_model):
    return [ready_model(f"sd2-{seed}.safetensors", name) for seed, name in ((1, "a"), (2, "b"), (3, "c"))]


def engine_report(models, settings, **options) -> dict:
    """What `sdmerge analyze` computes for the same files (same thread count as the worker)."""
    from merge_engine.analysis import AnalysisInput, analyze

    def as_input(model):
        return AnalysisInput(settings.model_roots[0] / model["path"].rsplit("/", 1)[1], model["name"], model["id"],
                             model["sha256"])

    base = options.pop("base", None)
    result = analyze([as_input(m) for m in models], base=as_input(base) if base else None,
                     threads=settings.merge_threads, **options)
    return json.loads(json.dumps(result.to_dict()))


def test_analysis_matches_the_engine_and_serves_pictures(client, run_tasks, sd2_models, settings):
    from merge_engine.analysis_report import heatmap_inches, map_inches, pixels

    a, b, c = sd2_models
    response = client.post("/analyses", json={"models": ["a", b["id"], "sha256:" + c["sha256"][:12]],
                                              "components": ["unet", "text_encoder"]})
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["status"] == "queued" and queued["result"] is None and queued["files"] is None
    assert [m["id"] for m in queued["models"]] == [a["id"], b["id"], c["id"]]
    assert queued["metrics"] == ["l2", "cosine"] and queued["architecture"] == "sd2"
    assert run_tasks() == ["sdmerge.analysis"]

    done = client.get(f"/analyses/{queued['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["progress"]["tensors_done"] == done["progress"]["tensors_total"] > 0
    report = {k: v for k, v in done["result"].items() if k != "seconds"}
    assert report == engine_report(sd2_models, settings, components=["unet", "text_encoder"])
    assert len(report["components"]["unet"]["l2"]) == 3 and report["components"]["unet"]["l2"][0][0] == 0

    for metric in ("cosine", "l2"):
        picture = client.get(done["files"]["heatmaps"]["unet"][metric])
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        assert png_size(picture.content) == pixels(heatmap_inches(3))
    default = client.get(f"/analyses/{queued['id']}/heatmap-text_encoder.png")
    assert default.content == client.get(f"/analyses/{queued['id']}/heatmap-text_encoder.png?metric=cosine").content
    mds = client.get(done["files"]["maps"]["text_encoder"])
    assert mds.status_code == 200 and png_size(mds.content) == pixels(map_inches(3))
    assert client.get(f"/analyses/{queued['id']}/map-vae.png").status_code == 404  # not analysed
    assert client.get(f"/analyses/{queued['id']}/heatmap-unet.png?metric=dot").status_code == 422

    names = sorted(f.rsplit("/", 1)[1] for f in data_files(settings))
    assert names == ["analysis.json", "heatmap-text_encoder-cosine.png", "heatmap-text_encoder-l2.png",
                     "heatmap-unet-cosine.png", "heatmap-unet-l2.png", "map-text_encoder.png", "map-unet.png"]
    assert all(f.startswith(f"artifacts/analyses/{queued['id']}/") for f in data_files(settings))


def test_task_vectors_against_a_base_and_default_components(client, run_tasks, sd2_models, ready_model, settings):
    base = ready_model("sd2-4.safetensors", "base")
    response = client.post("/analyses", json={"models": ["a", "b", "c"], "base": "base", "metrics": ["l2"]})
    assert response.status_code == 202, response.text
    assert response.json()["components"] == ["unet", "text_encoder", "vae"]
    run_tasks()
    done = client.get(f"/analyses/{response.json()['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["result"]["base"]["id"] == base["id"]
    report = {k: v for k, v in done["result"].items() if k != "seconds"}
    assert report == engine_report(sd2_models, settings, base=base, metrics=["l2"])
    # Only l2 was computed: it is the default heatmap, and cosine is not there.
    picture = client.get(f"/analyses/{done['id']}/heatmap-vae.png")
    assert picture.status_code == 200 and picture.content[:8] == PNG_SIGNATURE
    assert client.get(f"/analyses/{done['id']}/heatmap-vae.png?metric=cosine").status_code == 404


@pytest.mark.parametrize(("body", "status", "code", "needle"), [
    ({"models": ["a"]}, 422, "invalid_analysis", "at least 2 models"),
    ({"models": ["a", "nope", "sha256:0123456789ab"]}, 422, "unknown_model", "nope, sha256:0123456789ab"),
    ({"models": ["a", "b"], "base": "missing-base"}, 422, "unknown_model", "missing-base"),
    ({"models": ["a", "b"], "components": ["unet", "clip"]}, 422, "invalid_analysis", "unknown component 'clip'"),
    ({"models": ["a", "b"], "metrics": ["l1"]}, 422, "invalid_analysis", "unknown metric 'l1'"),
    ({"models": ["a", "sd1"]}, 422, "architecture_mismatch", "sd1"),
    ({"models": ["a", "b"], "metric": ["l2"]}, 422, "invalid_request", "metric"),
    ({"models": "a,b"}, 422, "invalid_request", "models"),
])
def test_bad_requests_are_clear_and_leave_nothing(client, ready_model, settings, body, status, code, needle):
    for filename, name in (("sd2-1.safetensors", "a"), ("sd2-2.safetensors", "b"), ("sd1-1.safetensors", "sd1")):
        ready_model(filename, name)
    response = client.post("/analyses", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and needle in error["message"], error
    if code == "unknown_model":
        assert [u["leaf"] for u in error["details"]["unresolved"]] == needle.split(", ")
    assert client.get("/analyses").json()["items"] == []
    assert data_files(settings) == []


def test_pictures_and_unknown_ids(client, sd2_models):
    queued = client.post("/analyses", json={"models": ["a", "b"]}).json()
    picture = client.get(f"/analyses/{queued['id']}/map-unet.png")
    assert picture.status_code == 404 and "queued" in picture.json()["error"]["message"]
    for url in ("/analyses/999", "/analyses/999/map-unet.png"):
        assert client.get(url).status_code == 404
    assert client.delete("/analyses/999").status_code == 404


def test_cancel_queued_and_running_then_delete(client, run_tasks, runtime, sd2_models, settings):
    from app.models import Analysis
    from worker.analyses import run_analysis
    from worker.lease import claim, new_owner

    queued = client.post("/analyses", json={"models": ["a", "b"]}).json()
    cancelled = client.delete(f"/analyses/{queued['id']}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert run_tasks() == ["sdmerge.analysis"]  # the message is still delivered, and does nothing
    assert client.get(f"/analyses/{queued['id']}").json()["attempts"] == 0

    running = client.post("/analyses", json={"models": ["a", "b", "c"]}).json()
    owner = new_owner()
    assert claim(runtime, Analysis, running["id"], owner)  # running: a cancel only raises the flag
    flagged = client.post(f"/analyses/{running['id']}/cancel")
    assert flagged.status_code == 202 and flagged.json()["status"] == "running" and flagged.json()["cancel_requested"]
    assert run_analysis(runtime, running["id"], owner) == "cancelled"
    after = client.get(f"/analyses/{running['id']}").json()
    assert after["status"] == "cancelled" and after["result"] is None and after["files"] is None
    assert data_files(settings) == []
    assert client.post(f"/analyses/{running['id']}/cancel").status_code == 409

    assert client.delete(f"/analyses/{running['id']}").status_code == 204  # a finished row is forgotten
    assert client.get(f"/analyses/{running['id']}").status_code == 404
    run_tasks()


def test_delete_a_finished_analysis_removes_its_report(client, run_tasks, sd2_models, settings):
    done = client.post("/analyses", json={"models": ["a", "b"], "components": ["vae"]}).json()
    run_tasks()
    assert client.get(f"/analyses/{done['id']}").json()["status"] == "succeeded"
    assert data_files(settings) != []
    assert client.delete(f"/analyses/{done['id']}").status_code == 204
    assert data_files(settings) == []
    assert client.get("/analyses").json()["items"] == []


def test_reaper_requeues_a_lapsed_analysis_and_a_run_finishes_once(client, run_tasks, runtime, sd2_models, settings):
    from datetime import timedelta

    from sqlalchemy import update

    from app.models import Analysis, utcnow
    from app.services.files import staging_dir
    from worker.lease import claim
    from worker.reaper import reap

    crashed = client.post("/analyses", json={"models": ["a", "b"], "components": ["text_encoder"]}).json()
    with runtime.celery.connection_for_read() as connection:
        connection.SimpleQueue("merge").clear()
    dead = "deadbeefdeadbeef"
    assert claim(runtime, Analysis, crashed["id"], dead)
    leftover = staging_dir(settings, "analysis", crashed["id"], dead)
    (leftover / "report").mkdir(parents=True)  # what the dead attempt had written
    with runtime.sessions.begin() as session:
        session.execute(update(Analysis).values(lease_expires_at=utcnow() - timedelta(hours=1)))
    report = reap(runtime)
    assert report["analysis_requeued"] == [crashed["id"]] and report["requeued"] == []
    assert not leftover.exists()
    assert run_tasks() == ["sdmerge.analysis"]
    done = client.get(f"/analyses/{crashed['id']}").json()
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert run_tasks() == [] and reap(runtime)["analysis_resent"] == []
