"""`sdmerge serve` as a real process: API + child worker on the embedded SQLite and filesystem
broker. Register, merge, poll, download with Range, compare with the CLI byte for byte,
resubmit, cancel, an analysis and a preview, docs offline; and every process it started is
gone afterwards."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from tests.service.conftest import SLOW_RECIPE, free_port
from tests.service.servers import SDMERGE, Process, service_env, wait_for, wait_healthy, wait_job


@pytest.fixture
def served(tmp_path, model_root):
    port = free_port()
    env = service_env(SDMERGE_JOB_LEASE_SECONDS="5", SDMERGE_MERGE_THREADS="1",
                      SDMERGE_HASH_CACHE=str(tmp_path / "hashes.sqlite3"))
    server = Process([*SDMERGE, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                      "--model-root", str(model_root)], env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, server)
        with httpx.Client(base_url=base, timeout=30) as client:
            yield client, server
    finally:
        children = server.children()
        assert server.stop() in (0, -15), server.output()  # uvicorn re-raises the SIGTERM it handled
        for pid in children:  # the embedded worker went down with the server
            wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid), 15, f"worker {pid} to exit")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def register(client: httpx.Client, filename: str, name: str) -> dict:
    response = client.post("/models", json={"path": filename, "name": name})
    assert response.status_code == 201, response.text
    return wait_for(lambda: (m := client.get(f"/models/{response.json()['id']}").json())["status"] == "ready" and m,
                    60, f"{name} to be hashed")


def test_serve_end_to_end(served, tmp_path, model_root):
    client, server = served
    assert client.get("/ready").json()["status"] == "ready"
    for page, asset in (("/docs", "/vendor/swagger-ui/swagger-ui-bundle.js"), ("/redoc", "/vendor/redoc/redoc.standalone.js")):
        html = client.get(page)
        assert html.status_code == 200 and asset in html.text
        assert "cdn" not in html.text.lower() and "https://" not in html.text
        assert "default-src 'self'" in html.headers["content-security-policy"]
        assert client.get(asset).status_code == 200
    assert client.get("/openapi.json").json()["info"]["title"] == "sdmerge"

    register(client, "sd2-1.safetensors", "a")
    register(client, "sd2-2.safetensors", "b")
    recipe = {"name": "e2e", "merge": {"method": "weighted", "models": [
        {"model": "a", "weight": 0.3}, {"model": "b", "weight": 0.7}]}}
    submitted = client.post("/merges", json=recipe)
    assert submitted.status_code == 202, submitted.text
    job = wait_job(client, submitted.json()["id"])
    assert job["status"] == "succeeded", job
    artifact = job["artifact"]

    half = artifact["size"] // 2
    first = client.get(artifact["url"], headers={"Range": f"bytes=0-{half - 1}"})
    rest = client.get(artifact["url"], headers={"Range": f"bytes={half}-", "If-Range": f'"{artifact["sha256"]}"'})
    assert (first.status_code, rest.status_code) == (206, 206)
    served_bytes = first.content + rest.content

    cli_recipe = {**recipe, "merge": {"method": "weighted", "models": [
        {"model": "sd2-1.safetensors", "weight": 0.3}, {"model": "sd2-2.safetensors", "weight": 0.7}]}}
    (tmp_path / "recipe.json").write_text(json.dumps(cli_recipe))
    subprocess.run([*SDMERGE, "merge", str(tmp_path / "recipe.json"), "-o", str(tmp_path / "cli.safetensors"),
                    "--model-root", str(model_root), "--quiet"], check=True, env=service_env())
    assert served_bytes == (tmp_path / "cli.safetensors").read_bytes()

    again = client.post("/merges", json=recipe)
    assert again.status_code == 200 and again.json()["id"] == job["id"]

    for filename in SLOW_RECIPE["merge"]["models"]:
        register(client, filename, filename)
    # The embedded worker runs one job at a time: while it merges `busy`, `doomed` waits queued.
    busy = client.post("/merges", json=SLOW_RECIPE).json()
    doomed = client.post("/merges", json={**SLOW_RECIPE, "output": {"dtype": "fp16"}}).json()
    cancelled = client.post(f"/merges/{doomed['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert wait_job(client, busy["id"])["status"] == "succeeded"
    wait_for(lambda: f"job {doomed['id']}: not claimable" in server.output(), 15, "the worker to skip it")
    assert client.get(f"/merges/{doomed['id']}").json()["status"] == "cancelled"
    data = tmp_path / "data"
    wait_for(lambda: not list((data / "tmp").iterdir()), 15, "partial files to be removed")
    assert len(list((data / "artifacts").rglob("*.safetensors"))) == 2

    # Analyses (merge queue) and previews (preview queue) run in the same embedded worker.
    analysis = client.post("/analyses", json={"models": ["a", "b"], "components": ["text_encoder"]})
    preview = client.post("/previews", json={"targets": ["a", {"merge": job["id"]}], "prompts": ["a cube"],
                                             "steps": 2, "width": 64, "height": 64})
    assert (analysis.status_code, preview.status_code) == (202, 202), (analysis.text, preview.text)
    for url in (f"/analyses/{analysis.json()['id']}", f"/previews/{preview.json()['id']}"):
        done = wait_for(lambda url=url: (row := client.get(url).json())["status"] not in ("queued", "running") and row,
                        120, f"{url} to finish")
        assert done["status"] == "succeeded", done
    picture = client.get(f"/analyses/{analysis.json()['id']}/heatmap-text_encoder.png")
    grid = client.get(f"/previews/{preview.json()['id']}/grid.png")
    assert picture.content[:8] == grid.content[:8] == b"\x89PNG\r\n\x1a\n"
    wait_for(lambda: not list((data / "tmp").iterdir()), 15, "staging folders to be removed")
