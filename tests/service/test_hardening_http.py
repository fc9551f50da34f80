"""The service against hostile and unlucky requests: bounded bodies, ids out of range, odd
references and paths, a full disk, poisoned files in a scan, and an OpenAPI document that tells
the truth about every answer."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import httpx
import pytest

from merge_engine.synthetic import tiny_state_dict, write_checkpoint
from tests.service.conftest import data_files, free_port
from tests.service.servers import SDMERGE, Process, service_env, wait_healthy


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


# -- bounded bodies -------------------------------------------------------------------------------

def test_a_body_over_the_cap_is_refused_unread(client, settings):
    limit = settings.max_json_bytes
    body = json.dumps({"merge": {"method": "uniform", "models": ["a.safetensors"] * (limit // 10)}}).encode()
    assert len(body) > limit
    for url in ("/merges", "/merges/plan", "/previews", "/analyses", "/models"):
        error = assert_error(client.post(url, content=body, headers={"content-type": "application/json"}),
                             413, "payload_too_large")
        assert error["details"]["limit"] == limit

    def chunked():  # no Content-Length: counted as it streams in
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    assert_error(client.post("/merges/plan", content=chunked(), headers={"content-type": "application/json"}),
                 413, "payload_too_large")


@pytest.mark.parametrize("text", ['{"merge": ' + "[" * 100_000 + "]" * 100_000 + "}",
                                  '{"merge": "a", "output": {"dtype": ' + "9" * 5000 + "}}",
                                  '{"path": "\\ud800"'])
def test_poison_json_bodies_are_400(client, text):
    for url in ("/merges", "/merges/plan", "/models", "/previews", "/analyses"):
        assert_error(client.post(url, content=text.encode(), headers={"content-type": "application/json"}),
                     400, "malformed_json")


def test_recipes_too_big_for_the_engine_are_422_at_once(client):
    error = assert_error(client.post("/merges/plan", json={"merge": {"method": "uniform",
                                                                     "models": ["a"] * 200_000}}),
                         422, "invalid_recipe")
    assert "more than 10000 times" in error["message"]


def test_bodies_are_decoded_off_the_event_loop(tmp_path, model_root):
    """A big body (within the cap) is decoded and planned in threads: /health keeps answering."""
    env = service_env(SDMERGE_DATA_DIR=str(tmp_path / "data"), SDMERGE_MODEL_ROOTS=str(model_root),
                      SDMERGE_MAX_JSON_BYTES=str(32 << 20))
    port = free_port()
    server = Process([*SDMERGE, "serve", "--port", str(port)], env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, server)
        names = [f"model-{i:07d}.safetensors" for i in range(9_000)]  # under the engine's caps
        body = json.dumps({"merge": {"method": "uniform", "models": names * 3}}).encode()
        slowest, done = [], threading.Event()

        def submit() -> None:
            with httpx.Client(base_url=base, timeout=120) as client:
                for _ in range(5):
                    assert client.post("/merges/plan", content=body,
                                       headers={"content-type": "application/json"}).status_code == 422
            done.set()

        thread = threading.Thread(target=submit)
        thread.start()
        with httpx.Client(base_url=base, timeout=30) as client:
            while not done.is_set():
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                slowest.append(time.perf_counter() - started)
        thread.join()
        # A generous bound, not a timing target: on the event loop, /health waited 24 s for one body.
        assert max(slowest) < 2.0, f"/health took {max(slowest):.2f} s while bodies were planned"
    finally:
        server.stop()


# -- ids, cursors, references and paths that used to be 500s --------------------------------------

def test_ids_and_cursors_out_of_range_are_4xx(client):
    spec = client.get("/openapi.json").json()
    huge = str(2**63)
    for path, operations in spec["paths"].items():
        if "{" not in path:
            continue
        url = (path.replace("{filename}", "x.safetensors").replace("{component}", "unet")
               .replace("{index}", "0"))
        for name in ("{model_id}", "{job_id}", "{artifact_id}", "{analysis_id}", "{preview_id}"):
            url = url.replace(name, huge)
        for method in operations:
            if "{" in url or path.startswith("/models/upload"):
                continue
            response = client.request(method.upper(), url)
            assert response.status_code == 422, (method, url, response.text)
            if method != "head":
                assert response.json()["error"]["code"] == "invalid_request"
    for url in ("/models", "/merges", "/analyses", "/previews"):
        for cursor in (huge, "²", "9" * 5000, "-1", "1e3"):
            assert_error(client.get(url, params={"cursor": cursor}), 400, "bad_request")


@pytest.mark.parametrize("ref", ["²", "9" * 5000, str(2**63), "\x00"])
def test_odd_references_are_unknown_models(client, ref):
    error = assert_error(client.post("/merges", json={"merge": ref}), 422, "unknown_model")
    assert error["details"]["unresolved"][0]["leaf"] == ref
    assert_error(client.post("/analyses", json={"models": [ref, ref]}), 422, "unknown_model")
    assert_error(client.post("/previews", json={"targets": [{"merge": 2**70}], "prompts": ["x"]}),
                 422, "invalid_preview")


def test_nul_bytes_and_symlink_loops_in_paths(client, model_root, settings):
    assert_error(client.post("/models", json={"path": "a\x00.safetensors"}), 422, "path_not_allowed")
    os.symlink(model_root / "loop-b.safetensors", model_root / "loop-a.safetensors")
    os.symlink(model_root / "loop-a.safetensors", model_root / "loop-b.safetensors")
    assert_error(client.post("/models", json={"path": "loop-a.safetensors"}), 422, "path_not_allowed")
    assert client.get("/models").json()["items"] == []


# -- a full disk ----------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB file system as the data dir (tmpfs; needs root, which CI is)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_507_and_not_ready(small_disk, model_root):
    from fastapi.testclient import TestClient

    from app.db import make_engine
    from app.main import create_app
    from app.migrate import upgrade
    from app.settings import settings_from_env

    data = small_disk / "data"
    settings = settings_from_env({"SDMERGE_DATA_DIR": str(data), "SDMERGE_MODEL_ROOTS": str(model_root),
                                  "SDMERGE_MIN_FREE_BYTES": str(2 << 20), "SDMERGE_MERGE_THREADS": "1"})
    settings.prepare_dirs()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    own = model_root / "own.safetensors"
    write_checkpoint(own, tiny_state_dict("sd2", seed=5))
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").json()["checks"]["disk"] == "ok"
        filler = _fill(small_disk)  # the file system full to the last block
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["disk"].startswith("error")
        assert ready.json()["disk"]["free_bytes"] < 2 << 20
        upload = client.put("/models/upload/up.safetensors", content=own.read_bytes())
        assert_error(upload, 507, "insufficient_storage")
        assert_error(client.post("/models", json={"path": "own.safetensors"}), 507, "insufficient_storage")
        assert data_files(settings) == []  # the partial upload is gone
        filler.unlink()
        assert client.get("/ready").status_code == 200
        assert client.post("/models", json={"path": "own.safetensors"}).status_code == 201
        assert client.put("/models/upload/up.safetensors", content=own.read_bytes()).status_code == 201


def _fill(mount) -> object:
    filler = mount / "filler"
    f = open(filler, "wb", buffering=0)
    try:
        while True:
            f.write(b"\0" * 65536)
    except OSError:
        pass
    finally:
        try:
            f.close()
        except OSError:
            pass
    return filler


def test_a_merge_on_a_full_disk_fails_cleanly_and_runs_once_there_is_room(small_disk, model_root, tmp_path):
    """The data dir (artifacts, partial files) on a full file system, the database elsewhere (as
    PostgreSQL is in production): the attempt fails with insufficient_storage and leaves nothing."""
    from fastapi.testclient import TestClient

    from app.db import make_engine
    from app.main import create_app
    from app.migrate import upgrade
    from app.queue import QUEUES
    from app.settings import settings_from_env
    from worker.tasks import HANDLERS

    settings = settings_from_env({"SDMERGE_DATA_DIR": str(small_disk / "data"),
                                  "SDMERGE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                                  "SDMERGE_MODEL_ROOTS": str(model_root), "SDMERGE_MIN_FREE_BYTES": "0",
                                  "SDMERGE_MERGE_THREADS": "1"})
    settings.prepare_dirs()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    with TestClient(create_app(settings)) as client:
        runtime = client.app.state.runtime

        def drain() -> None:
            with runtime.celery.connection_for_read() as connection:
                for name in QUEUES:
                    queue = connection.SimpleQueue(name)
                    while True:
                        try:
                            message = queue.get(block=False)
                        except queue.Empty:
                            break
                        HANDLERS[message.headers["task"]](runtime, *message.payload[0])
                        message.ack()
                    queue.close()

        for name in ("sd2-1.safetensors", "sd2-2.safetensors"):
            client.post("/models", json={"path": name})
        drain()
        recipe = {"merge": {"method": "uniform", "models": ["sd2-1.safetensors", "sd2-2.safetensors"]},
                  "output": {"dtype": "fp32"}}
        job = client.post("/merges", json=recipe).json()
        filler = _fill(small_disk)
        drain()
        failed = client.get(f"/merges/{job['id']}").json()
        assert failed["status"] == "failed" and failed["error"]["code"] == "insufficient_storage", failed
        assert data_files(settings) == []
        filler.unlink()
        again = client.post("/merges", json=recipe).json()
        assert again["id"] != job["id"]
        drain()
        done = client.get(f"/merges/{again['id']}").json()
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        assert [p for p in data_files(settings) if p.startswith("artifacts/")] == [
            f"artifacts/{done['artifact']['sha256'][:2]}/{done['artifact']['sha256']}.safetensors"]
        assert not [p for p in data_files(settings) if not p.startswith("artifacts/")]


# -- poisoned files never block the others ----------------------------------------------------------

def _poison_files(root) -> list[str]:
    deep = "[" * 20_000 + "]" * 20_000
    bad = {"deep.safetensors": ('{"a": ' + deep + "}").encode(),
           "digits.safetensors": b'{"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, ' + b"9" * 5000 + b"]}}",
           "utf16.safetensors": json.dumps({"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}})
           .encode("utf-16")}
    for name, text in bad.items():
        (root / name).write_bytes(len(text).to_bytes(8, "little") + text + b"\0\0")
    return sorted(bad)


def test_scan_registers_the_good_and_skips_the_poisoned(client, model_root):
    bad = _poison_files(model_root)
    for name in bad:
        assert_error(client.post("/models", json={"path": name}), 422, "bad_checkpoint")
    found = client.post("/models/scan").json()
    assert sorted(os.path.basename(s["path"]) for s in found["skipped"]) == bad
    assert {s["error"]["code"] for s in found["skipped"]} == {"bad_checkpoint"}
    assert len(found["registered"]) == len([p for p in model_root.iterdir() if p.name not in bad])


def test_serve_scan_starts_despite_poisoned_files(tmp_path, model_root):
    bad = _poison_files(model_root)
    env = service_env(SDMERGE_DATA_DIR=str(tmp_path / "data"), SDMERGE_MODEL_ROOTS=str(model_root))
    port = free_port()
    server = Process([*SDMERGE, "serve", "--port", str(port), "--scan"], env, tmp_path / "serve.log")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server)
        models = httpx.get(f"http://127.0.0.1:{port}/models", timeout=10).json()["items"]
        assert {m["name"] for m in models} == {p.name for p in model_root.iterdir()} - set(bad)
    finally:
        server.stop()
    assert "skipped 3" in server.output()


# -- the OpenAPI document -------------------------------------------------------------------------

def test_every_error_is_documented_in_the_error_shape(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ErrorOut" in schemas and "Recipe" in schemas
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path != "/health":
                assert {"401", "503"} <= set(responses), (method, path)
            if "{" in path or operation.get("parameters"):
                assert "422" in responses, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= set(responses), (method, path)
            for status, response in responses.items():
                if status[0] in "45" and status != "416":
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorOut"}, (method, path, status)
    body = spec["paths"]["/merges"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/Recipe"} in body["anyOf"]
    assert spec["paths"]["/merges/plan"]["post"]["requestBody"] == spec["paths"]["/merges"]["post"]["requestBody"]


def test_405_says_what_is_allowed(client):
    response = client.put("/merges")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST" or set(response.headers["allow"].split(", ")) >= {"GET", "POST"}
    response = client.post("/artifacts/1")
    assert response.status_code == 405 and set(response.headers["allow"].split(", ")) >= {"GET", "HEAD", "DELETE"}
