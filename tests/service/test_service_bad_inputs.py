"""Bad input: each a clear 4xx with the error envelope, and no row or file left behind."""

from __future__ import annotations

import os

import pytest

from tests.service.conftest import data_files


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


@pytest.fixture
def nothing_left(client, settings):
    """After the test: no model, job or artifact rows, and no files in the service's folders."""
    yield
    assert client.get("/models").json()["items"] == []
    assert client.get("/merges").json()["items"] == []
    assert data_files(settings) == []


def test_malformed_json(client, nothing_left):
    for url in ("/models", "/merges", "/merges/plan"):
        response = client.post(url, content=b'{"path": ', headers={"content-type": "application/json"})
        assert_error(response, 400, "malformed_json")


def test_unknown_fields(client, nothing_left, ready_model):
    assert_error(client.post("/models", json={"path": "sd2-1.safetensors", "colour": "red"}), 422, "invalid_request")
    ready_model("sd2-1.safetensors", "a")
    error = assert_error(client.post("/merges", json={"merge": "a", "colour": "red"}), 422, "invalid_recipe")
    assert "colour" in error["message"]
    client.delete("/models/1")


def test_invalid_recipe_names_the_field(client, nothing_left):
    error = assert_error(client.post("/merges", json={"merge": {"method": "weighted", "models": [
        {"model": "a", "weight": -1}]}}), 422, "invalid_recipe")
    assert "merge" in error["message"]


def test_unknown_models_are_listed(client, nothing_left):
    error = assert_error(client.post("/merges", json={"merge": {"method": "uniform", "models": [
        "nope", "sha256:0123456789ab"]}}), 422, "unknown_model")
    assert [u["leaf"] for u in error["details"]["unresolved"]] == ["nope", "sha256:0123456789ab"]


def test_model_still_hashing_is_409(client, nothing_left):
    model = client.post("/models", json={"path": "sd2-1.safetensors", "name": "a"}).json()
    assert_error(client.post("/merges", json={"merge": "a"}), 409, "model_not_ready")
    client.delete(f"/models/{model['id']}")


@pytest.mark.parametrize("path", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors",
                                  "link.safetensors"])
def test_paths_outside_the_roots(client, model_root, tmp_path, nothing_left, path):
    outside = tmp_path / "outside.safetensors"
    os.link(model_root / "sd2-1.safetensors", outside)
    (model_root / "link.safetensors").symlink_to(outside)
    error = assert_error(client.post("/models", json={"path": path}), 422, "path_not_allowed")
    assert error["details"]["path"] == path


def test_missing_and_non_checkpoint_files(client, model_root, nothing_left):
    assert_error(client.post("/models", json={"path": "missing.safetensors"}), 422, "path_not_allowed")
    (model_root / "notes.txt").write_text("hello")
    assert_error(client.post("/models", json={"path": "notes.txt"}), 422, "bad_checkpoint")
    (model_root / "broken.safetensors").write_bytes(b"\xff" * 64)
    assert_error(client.post("/models", json={"path": "broken.safetensors"}), 422, "bad_checkpoint")
    (model_root / "fake.ckpt").write_bytes(b"not a zip")
    assert_error(client.post("/models", json={"path": "fake.ckpt"}), 422, "bad_checkpoint")


def test_bad_model_names(client, nothing_left):
    assert_error(client.post("/models", json={"path": "sd2-1.safetensors", "name": "a/b"}), 400, "bad_request")


def test_upload_over_the_cap(client, settings, nothing_left):
    too_big = b"\0" * (settings.max_upload_bytes + 1)
    assert_error(client.put("/models/upload/big.safetensors", content=too_big), 413, "payload_too_large")

    def stream():  # no Content-Length: the cap is enforced while streaming
        for _ in range(settings.max_upload_bytes // (1 << 20) + 1):
            yield b"\0" * (1 << 20)

    assert_error(client.put("/models/upload/big.safetensors", content=stream()), 413, "payload_too_large")


def test_upload_with_broken_header(client, model_root, nothing_left):
    body = bytearray((model_root / "sd2-1.safetensors").read_bytes())
    body[8:16] = b"not json"
    assert_error(client.put("/models/upload/broken.safetensors", content=bytes(body)), 422, "bad_checkpoint")
    truncated = (model_root / "sd2-1.safetensors").read_bytes()[:1000]
    assert_error(client.put("/models/upload/short.safetensors", content=truncated), 422, "bad_checkpoint")


def test_upload_bad_file_names(client, nothing_left):
    assert_error(client.put("/models/upload/x.txt", content=b"1"), 422, "bad_checkpoint")
    assert client.put("/models/upload/..%2Fescape.safetensors", content=b"1").status_code in (400, 404)


def test_mixed_architectures(client, ready_model, settings):
    ready_model("sd2-1.safetensors", "two")
    ready_model("sd1-1.safetensors", "one")
    error = assert_error(client.post("/merges", json={"merge": {"method": "uniform", "models": ["two", "one"]}}),
                         422, "architecture_mismatch")
    assert error["details"]["model"] == "one"
    assert client.get("/merges").json()["items"] == []
    assert data_files(settings) == []


def test_not_found_and_bad_ids(client):
    assert_error(client.get("/models/999"), 404, "not_found")
    assert_error(client.get("/merges/999"), 404, "not_found")
    assert_error(client.post("/merges/999/cancel"), 404, "not_found")
    assert_error(client.get("/artifacts/999"), 404, "not_found")
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.get("/models/abc"), 422, "invalid_request")
    assert_error(client.get("/merges", params={"cursor": "x"}), 400, "bad_request")


def test_token_is_required_when_set(settings):
    import dataclasses

    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(dataclasses.replace(settings, api_token="s3cret"))) as client:
        assert client.get("/health").status_code == 200
        for url in ("/models", "/ready", "/merges/1", "/docs/x", "/vendorx", "/artifacts/1"):
            assert_error(client.get(url), 401, "unauthorized")
        # The docs load before a user has a token to give (Swagger's Authorize button takes it)
        for url in ("/docs", "/redoc", "/openapi.json", "/vendor/swagger-ui/swagger-ui.css"):
            assert client.get(url).status_code == 200, url
        assert_error(client.get("/models", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        assert client.get("/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
