"""Operations on a real `sdmerge serve` (API + child worker): `sdmerge status` over HTTP while a
preview renders (its worker paused so the view is caught mid-run), JSON log lines that each
carry the id of the work they were logged for, and the worker's presence for its health check."""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import pytest

from app.status_cli import render, running_line
from tests.service.conftest import free_port
from tests.service.servers import SDMERGE, Process, service_env, wait_for, wait_healthy, wait_job

TOKEN = "status-token"
PREVIEW = {"targets": ["sd2-1.safetensors", "sd2-2.safetensors"], "prompts": [f"a cube {i}" for i in range(6)],
           "seeds": [1, 2], "steps": 6, "width": 64, "height": 64}


@pytest.fixture
def served(tmp_path, model_root):
    port = free_port()
    env = service_env(SDMERGE_JOB_LEASE_SECONDS="5", SDMERGE_MERGE_THREADS="1", SDMERGE_LOG_FORMAT="json",
                      SDMERGE_API_TOKEN=TOKEN, SDMERGE_HASH_CACHE=str(tmp_path / "hashes.sqlite3"))
    server = Process([*SDMERGE, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                      "--model-root", str(model_root)], env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, server)
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            yield client, server, base, env
    finally:
        server.stop()


def status_cli(base: str, env: dict, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {**env, "SDMERGE_API_TOKEN": token or ""}
    return subprocess.run([*SDMERGE, "status", "--url", base], env=env, capture_output=True, text=True, timeout=60)


def test_status_view_and_json_logs_of_real_jobs(served, tmp_path):
    client, server, base, env = served
    ids = [client.post("/models", json={"path": name}).json()["id"] for name in PREVIEW["targets"]]
    for model_id in ids:
        wait_for(lambda m=model_id: client.get(f"/models/{m}").json()["status"] == "ready", 60, "hashing")
    merge = client.post("/merges", json={"merge": {"method": "uniform", "models": PREVIEW["targets"]}}).json()
    assert wait_job(client, merge["id"])["status"] == "succeeded"
    preview = client.post("/previews", json=PREVIEW).json()

    def rendering() -> bool:
        row = client.get(f"/previews/{preview['id']}").json()
        return row["status"] == "running" and bool((row["progress"] or {}).get("images_done"))

    wait_for(rendering, 120, "the preview to be rendering", interval=0.05)
    (worker,) = server.children()
    subprocess.run(["kill", "-STOP", str(worker)], check=True)  # caught mid-run while we look
    try:
        shown = status_cli(base, env)
        refused = status_cli(base, env, token=None)
    finally:
        subprocess.run(["kill", "-CONT", str(worker)], check=True)
    assert shown.returncode == 0, shown.stderr
    view = shown.stdout
    assert "broker   ok" in view and "merge 0" in view
    assert re.search(r"workers  1 alive, 0 stale\n  sdmerge-\d+@\S+ +merge,hash,preview +cpu +beat \d+s ago  "
                     rf"preview {preview['id']}\n", view), view
    line = next(x for x in view.splitlines() if x.startswith(f"  preview {preview['id']} "))
    assert re.search(r"\[#+\.*\] +\d+%  \d+/24 images", line), line
    assert re.search(r"  merge +0 +0 +1 +0 +0\n", view), view
    assert refused.returncode == 1 and "401" in refused.stderr and "SDMERGE_API_TOKEN" in refused.stderr

    done = wait_for(lambda: (p := client.get(f"/previews/{preview['id']}").json())["status"] != "running"
                    and p["status"] != "queued" and p, 240, "the preview to finish")
    assert done["status"] == "succeeded", done
    checked = subprocess.run([*SDMERGE, "worker", "--check"], env={**env, "SDMERGE_DATA_DIR": str(tmp_path / "data")},
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    server.stop()

    entries = [json.loads(line) for line in server.output().splitlines() if line.strip()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    for kind, row_id in (("job", merge["id"]), ("preview", preview["id"])):
        own = [e for e in entries if e["message"].startswith(f"{kind} {row_id}: ")]
        assert {e["message"].split(": ")[1].split(" ")[0] for e in own} >= {"claimed", "succeeded"}, own
        assert {(e.get("kind"), e.get("job_id")) for e in own} == {(kind, row_id)}, own
        assert all(e.get("task_id") for e in own), own
    assert any(e["logger"].startswith("celery") for e in entries)  # Celery's own lines, as JSON too


def test_the_view_of_a_running_merge():
    merge = {"kind": "merge", "id": 7, "name": "soup", "heartbeat_age_seconds": 0.4, "lease_expired": False,
             "progress": {"bytes_read": 3 * 2**30, "bytes_total": 4 * 2**30, "rate_bytes_per_second": 2**30,
                          "eta_seconds": 1.0, "tensors_done": 1, "tensors_total": 2, "elapsed": 3.0}}
    assert running_line(merge) == ("merge 7 soup                 [##################......]  75%  "
                                   "3.0 GiB/4.0 GiB  1.0 GiB/s  ETA 1s  beat 0s ago")
    stale = {**merge, "progress": None, "lease_expired": True, "heartbeat_age_seconds": 75}
    assert running_line(stale).endswith("[........................]   0%  starting  beat 1m15s ago  LEASE EXPIRED")
    status = {"time": "t", "broker": {"status": "error: down", "queues": {}}, "workers": [], "running": [merge],
              "work": {"merge": {"running": 1}, "shard": {"queued": 2}}, "recent_failures": [
                  {"kind": "merge", "id": 6, "finished_at": "f", "error": {"code": "bad", "message": "no"}}],
              "disk": {"free_bytes": None}}
    view = render(status, "http://x")
    assert "broker   error: down\n" in view and "  merge 6  f  bad: no" in view and running_line(merge) in view
    assert "\n  shard            2         0         0" in view  # every kind the API counts has its row


def test_the_view_of_an_answer_that_is_no_status(monkeypatch):
    from app import status_cli

    monkeypatch.setattr(status_cli, "fetch", lambda url, token: {"detail": "Not Found"})
    with pytest.raises(status_cli.StatusError, match="answered something other than a status"):
        status_cli._view("http://x", None)


def test_worker_presence_and_its_health_check(tmp_path):
    from app.presence import Presence, check_local, read_workers, worker_name
    from app.settings import settings_from_env

    settings = settings_from_env({"SDMERGE_DATA_DIR": str(tmp_path)})
    assert "no worker of" in check_local(settings)
    presence = Presence(settings, worker_name(), ["merge"], "cpu").start()
    try:
        (seen,) = read_workers(settings)
        assert seen["alive"] and seen["queues"] == ["merge"] and seen["running"] is None
        assert check_local(settings) is None
        (seen,) = read_workers(settings, now=seen["beat_at"] + 31)
        assert not seen["alive"]
        presence._stop.set()  # its beat thread stalls (the process lives on)
        presence._thread.join()
        stale = {**json.loads(presence.path.read_text()), "beat_at": seen["beat_at"] - 60}
        presence.path.write_text(json.dumps(stale))  # a worker whose beat thread stalled
        assert "stopped beating" in check_local(settings)
        presence.path.write_text(json.dumps({**stale, "pid": 2**22 + 1}))  # killed: no such process
        assert read_workers(settings) == [] and not presence.path.exists()
    finally:
        presence.stop()
    assert read_workers(settings) == [] and "no worker of" in check_local(settings)


def test_celery_events_only_in_scale_out(tmp_path):
    from app.queue import make_celery
    from app.settings import settings_from_env

    embedded = make_celery(settings_from_env({"SDMERGE_DATA_DIR": str(tmp_path)})).conf
    scaled = make_celery(settings_from_env({"SDMERGE_DATA_DIR": str(tmp_path),
                                            "SDMERGE_BROKER_URL": "redis://127.0.0.1:1/0"})).conf
    assert (embedded.worker_send_task_events, embedded.task_send_sent_event) == (False, False)
    assert (scaled.worker_send_task_events, scaled.task_send_sent_event) == (True, True)
