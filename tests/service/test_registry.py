"""Registry API against a migrated database: register, hash in the worker, list, find, delete."""

from __future__ import annotations

import hashlib
import os

from tests.service.conftest import SEEDS, SLOW_SEEDS, data_files


def test_register_hash_and_get(client, run_tasks, model_root):
    response = client.post("/models", json={"path": "sd2-1.safetensors"})
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["status"] == "hashing" and model["sha256"] is None
    assert model["name"] == "sd2-1.safetensors"
    assert run_tasks() == ["sdmerge.hash_model"]
    model = client.get(f"/models/{model['id']}").json()
    expected = hashlib.sha256((model_root / "sd2-1.safetensors").read_bytes()).hexdigest()
    assert model["status"] == "ready"
    assert model["sha256"] == expected
    assert len(model["legacy_hash"]) == 8 and len(model["autov3"]) == 64
    assert model["architecture"] == "sd2"
    assert set(model["components"]) >= {"unet", "text_encoder", "vae"}
    assert model["components"]["unet"]["keys"] > 0


def test_same_path_again_answers_existing_and_hashes_once(client, run_tasks):
    first = client.post("/models", json={"path": "sd2-1.safetensors", "name": "one"})
    run_tasks()
    again = client.post("/models", json={"path": "sd2-1.safetensors", "name": "other name"})
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["status"] == "ready"
    assert run_tasks() == []  # same (path, size, mtime): nothing to hash again


def test_changed_file_is_hashed_again(client, run_tasks, model_root):
    path = model_root / "mine.safetensors"
    path.write_bytes((model_root / "sd2-1.safetensors").read_bytes())
    first = client.post("/models", json={"path": "mine.safetensors"}).json()
    run_tasks()
    old_sha = client.get(f"/models/{first['id']}").json()["sha256"]
    path.unlink()
    path.write_bytes((model_root / "sd2-2.safetensors").read_bytes())
    again = client.post("/models", json={"path": "mine.safetensors"})
    assert again.status_code == 200 and again.json()["status"] == "hashing"
    assert run_tasks() == ["sdmerge.hash_model"]
    assert client.get(f"/models/{first['id']}").json()["sha256"] not in (None, old_sha)


def test_name_taken_by_another_file_is_409(client):
    client.post("/models", json={"path": "sd2-1.safetensors", "name": "base"})
    response = client.post("/models", json={"path": "sd2-2.safetensors", "name": "base"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"


def test_list_filters_and_pages(client, run_tasks):
    for seed in (1, 2, 3):
        client.post("/models", json={"path": f"sd2-{seed}.safetensors"})
    client.post("/models", json={"path": "sd1-1.safetensors"})
    run_tasks()
    assert [m["name"] for m in client.get("/models", params={"architecture": "sd1"}).json()["items"]] == [
        "sd1-1.safetensors"]
    page = client.get("/models", params={"limit": 2, "architecture": "sd2"}).json()
    assert len(page["items"]) == 2 and page["next"]
    rest = client.get("/models", params={"limit": 2, "architecture": "sd2", "cursor": page["next"]}).json()
    assert [m["name"] for m in rest["items"]] == ["sd2-3.safetensors"]
    assert client.get("/models", params={"name": "sd2-2"}).json()["items"][0]["name"] == "sd2-2.safetensors"


def test_scan_registers_everything_once(client, run_tasks, model_root):
    (model_root / "notes.txt").write_text("not a model")
    (model_root / "sub").mkdir()
    os.link(model_root / "sd2-3.safetensors", model_root / "sub" / "copy.safetensors")
    response = client.post("/models/scan")
    assert response.status_code == 200, response.text
    assert len(response.json()["registered"]) == len(SEEDS) + len(SLOW_SEEDS) + 2  # and sd1-1, sub/copy
    assert client.post("/models/scan").json()["registered"] == []
    run_tasks()
    statuses = {m["status"] for m in client.get("/models").json()["items"]}
    assert statuses == {"ready"}


def test_delete_forgets_the_model_but_not_the_file(client, model_root):
    model = client.post("/models", json={"path": "sd2-1.safetensors"}).json()
    assert client.delete(f"/models/{model['id']}").status_code == 204
    assert client.get(f"/models/{model['id']}").status_code == 404
    assert (model_root / "sd2-1.safetensors").exists()


def test_upload_streams_checks_and_registers(client, run_tasks, model_root, settings):
    body = (model_root / "sd2-4.safetensors").read_bytes()
    response = client.put("/models/upload/uploaded.safetensors", content=body)
    assert response.status_code == 201, response.text
    run_tasks()
    model = client.get(f"/models/{response.json()['id']}").json()
    assert model["status"] == "ready" and model["sha256"] == hashlib.sha256(body).hexdigest()
    assert data_files(settings) == ["models/uploaded.safetensors"]
    again = client.put("/models/upload/uploaded.safetensors", content=body)
    assert again.status_code == 409
    assert data_files(settings) == ["models/uploaded.safetensors"]
    assert client.delete(f"/models/{model['id']}").status_code == 204
    assert data_files(settings) == []


def test_model_references_by_id_name_and_sha256(client, ready_model, runtime):
    from app.services import registry

    model = ready_model("sd2-1.safetensors", "base")
    with runtime.sessions() as session:
        assert registry.find(session, "base").id == model["id"]
        assert registry.find(session, str(model["id"])).id == model["id"]
        assert registry.find(session, "sha256:" + model["sha256"][:10]).id == model["id"]
        assert registry.find(session, "sha256:" + model["sha256"].upper()).id == model["id"]
