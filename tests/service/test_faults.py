"""Faults, on real processes: a worker SIGKILLed mid-preview and mid-hash, Redis restarted with its
queued messages lost, the API killed and started again, the embedded worker killed mid-merge,
and the embedded `sdmerge serve` killed (its child worker with it) and started again.
Every job completes exactly once, one artifact per recipe, and no partial file is left.
(A worker killed mid-merge on the scale-out topology: test_scale_out.py.)"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import httpx
import pytest

from merge_engine.synthetic import tiny_state_dict
from tests.service.conftest import (
    SLOW_RECIPE,
    SLOW_SEEDS,
    create_database,
    drop_database,
    free_port,
)
from tests.service.servers import SDMERGE, Process, service_env, wait_for, wait_healthy, wait_job
from tests.service.test_scale_out import completions, register

LEASE_SECONDS = 2


class RedisServer:
    """A redis-server of this module's own, without persistence, that can be killed and restarted."""

    def __init__(self, folder) -> None:
        self.folder, self.port = folder, free_port()
        self.process = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        wait_for(lambda: _pings(redis.Redis(port=self.port)), 20, "redis-server to start")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def _pings(client) -> bool:
    try:
        return client.ping()
    except Exception:  # noqa: BLE001 - not up yet
        return False


@pytest.fixture
def topology(tmp_path, model_root, postgres_server_url):
    """PostgreSQL, our own redis-server, `sdmerge serve` (API only) and two workers."""
    database = create_database(postgres_server_url, "sdmerge_faults")
    redis_server = RedisServer(tmp_path)
    env = service_env(SDMERGE_DATABASE_URL=database, SDMERGE_BROKER_URL=redis_server.url,
                      SDMERGE_DATA_DIR=str(tmp_path / "data"), SDMERGE_MODEL_ROOTS=str(model_root),
                      SDMERGE_JOB_LEASE_SECONDS=str(LEASE_SECONDS), SDMERGE_MERGE_THREADS="1",
                      SDMERGE_PREVIEW_DEVICE="cpu", SDMERGE_HASH_CACHE=str(tmp_path / "hashes.sqlite3"))
    subprocess.run([*SDMERGE, "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    processes = {"api": Process([*SDMERGE, "serve", "--port", str(port)], env, tmp_path / "serve.log")}
    for n in (1, 2):
        processes[f"worker{n}"] = Process([*SDMERGE, "worker"], env, tmp_path / f"worker{n}.log")
    base = f"http://127.0.0.1:{port}"

    def restart_api() -> None:
        processes["api"].kill()
        processes["api"] = Process([*SDMERGE, "serve", "--port", str(port)], env, tmp_path / "serve2.log")
        wait_healthy(base, processes["api"])

    try:
        wait_healthy(base, processes["api"])
        with httpx.Client(base_url=base, timeout=60) as client:
            wait_for(lambda: client.get("/ready").status_code == 200, 30, "the API to be ready")
            yield {"client": client, "processes": processes, "redis": redis_server, "restart_api": restart_api,
                   "data": tmp_path / "data", "env": env}
    finally:
        for process in processes.values():
            process.stop()
        redis_server.kill()
        drop_database(postgres_server_url, database)


def workers(topology) -> list[Process]:
    return [p for name, p in topology["processes"].items() if name.startswith("worker")]


def slow_recipes(count: int) -> list[dict]:
    models = SLOW_RECIPE["merge"]["models"]
    return [{**SLOW_RECIPE, "merge": {"method": "weighted", "models": [
        {"model": m, "weight": 1 + (i + k) % 3} for k, m in enumerate(models)]}} for i in range(count)]


def settled(data) -> None:
    wait_for(lambda: not list((data / "tmp").iterdir()), 20, "every partial file to be gone")


def test_redis_restart_loses_the_queue_and_every_job_completes_once(topology):
    client, data = topology["client"], topology["data"]
    register(client, SLOW_RECIPE["merge"]["models"])
    for worker in workers(topology):  # so the messages are surely still queued when Redis dies
        worker.popen.send_signal(signal.SIGSTOP)
    try:
        jobs = [client.post("/merges", json=recipe).json() for recipe in slow_recipes(6)]
        topology["redis"].kill()  # the queued messages are gone with it
        time.sleep(1)
        topology["redis"].start()
    finally:
        for worker in workers(topology):
            worker.popen.send_signal(signal.SIGCONT)
    done = [wait_job(client, job["id"], timeout=180) for job in jobs]
    assert {j["status"] for j in done} == {"succeeded"}, done
    assert completions(workers(topology)) == {j["id"]: 1 for j in done}
    assert len(list((data / "artifacts").rglob("*.safetensors"))) == len({j["recipe_hash"] for j in done})
    assert any("'resent'" in w.output() for w in workers(topology))  # the reaper sent the lost ones again
    settled(data)


def test_the_api_killed_mid_flight_and_restarted(topology):
    client, data = topology["client"], topology["data"]
    register(client, SLOW_RECIPE["merge"]["models"])
    jobs = [client.post("/merges", json=recipe).json() for recipe in slow_recipes(4)]
    topology["restart_api"]()
    again = [client.post("/merges", json=recipe) for recipe in slow_recipes(4)]  # dedupe survives too
    assert [a.json()["id"] for a in again] == [j["id"] for j in jobs]
    done = [wait_job(client, job["id"], timeout=180) for job in jobs]
    assert {j["status"] for j in done} == {"succeeded"}
    assert completions(workers(topology)) == {j["id"]: 1 for j in done}
    settled(data)


PREVIEW_BODY = {"targets": ["sd2-1.safetensors", "sd2-2.safetensors"], "prompts": [f"a cube {i}" for i in range(6)],
                "seeds": [1, 2], "steps": 6, "width": 64, "height": 64}


def _rendering(client, preview_id: int) -> bool:
    row = client.get(f"/previews/{preview_id}").json()
    return row["status"] == "running" and bool((row["progress"] or {}).get("images_done"))


def _preview_done(client, preview_id: int, timeout: float = 240) -> dict:
    return wait_for(lambda: (p := client.get(f"/previews/{preview_id}").json())["status"]
                    in ("succeeded", "failed") and p, timeout, "the preview to finish")


def test_redis_restart_while_a_preview_runs_and_merges_wait(topology):
    """Redis dies with one worker mid-preview (its message taken, unacknowledged) and merges
    queued behind it: the preview goes on under its lease, and the lost merges are re-sent."""
    client, data = topology["client"], topology["data"]
    register(client, [*PREVIEW_BODY["targets"], *SLOW_RECIPE["merge"]["models"]])
    idle, busy = workers(topology)
    idle.popen.send_signal(signal.SIGSTOP)  # so the merges surely wait in Redis when it dies
    try:
        preview = client.post("/previews", json=PREVIEW_BODY).json()
        wait_for(lambda: _rendering(client, preview["id"]), 120, "the preview to be rendering", interval=0.05)
        jobs = [client.post("/merges", json=recipe).json() for recipe in slow_recipes(3)]
        topology["redis"].kill()
        time.sleep(1)
        topology["redis"].start()
    finally:
        idle.popen.send_signal(signal.SIGCONT)
    done = [wait_job(client, job["id"], timeout=180) for job in jobs]
    assert {j["status"] for j in done} == {"succeeded"}, done
    assert completions(workers(topology)) == {j["id"]: 1 for j in done}
    rendered = _preview_done(client, preview["id"])
    assert rendered["status"] == "succeeded" and rendered["attempts"] == 1, rendered
    assert sum(w.output().count(f"preview {preview['id']}: succeeded") for w in workers(topology)) == 1
    assert any("'resent'" in w.output() for w in workers(topology))
    settled(data)


def test_a_worker_killed_mid_preview_renders_it_once_elsewhere(topology):
    client, data = topology["client"], topology["data"]
    register(client, ["sd2-1.safetensors", "sd2-2.safetensors"])
    body = {"targets": ["sd2-1.safetensors", "sd2-2.safetensors"], "prompts": [f"a cube {i}" for i in range(6)],
            "seeds": [1, 2], "steps": 6, "width": 64, "height": 64}
    preview = client.post("/previews", json=body).json()

    def rendering():
        row = client.get(f"/previews/{preview['id']}").json()
        if row["status"] != "running" or not (row["progress"] or {}).get("images_done"):
            return None
        return next((w for w in workers(topology) if f"preview {preview['id']}: claimed" in w.output()), None)

    victim = wait_for(rendering, 120, "a worker to be rendering the preview", interval=0.05)
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait()
    done = wait_for(lambda: (p := client.get(f"/previews/{preview['id']}").json())["status"]
                    in ("succeeded", "failed") and p, 240, "the preview to finish")
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert len(done["images"]) == 24 and client.get(done["grid"]).status_code == 200
    survivors = [w for w in workers(topology) if w is not victim]
    assert sum(w.output().count(f"preview {preview['id']}: succeeded") for w in survivors) == 1
    assert f"preview {preview['id']}: succeeded" not in victim.output()
    settled(data)


def _sparse_checkpoint(path, gigabytes: float) -> None:
    """A tiny SD2 checkpoint plus one big all-zero tensor left as a hole in the file: hashing it
    reads gigabytes (slow enough to be killed midway) that cost no disk."""
    state = tiny_state_dict("sd2", seed=9)
    header, offset, blobs = {}, 0, []
    for key in sorted(state):
        data = state[key].contiguous().view(-1).numpy().tobytes()
        dtype = {"torch.float16": "F16", "torch.float32": "F32", "torch.int64": "I64"}[str(state[key].dtype)]
        header[key] = {"dtype": dtype, "shape": list(state[key].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    big = int(gigabytes * 2**30) // 2
    header["model.diffusion_model.zz_big.weight"] = {"dtype": "F16", "shape": [big], "data_offsets": [offset, offset + 2 * big]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))
        f.truncate(8 + len(text) + offset + 2 * big)


def test_a_worker_killed_mid_hash_is_hashed_by_another(topology, model_root):
    client = topology["client"]
    _sparse_checkpoint(model_root / "big.safetensors", 3)
    model = client.post("/models", json={"path": "big.safetensors"}).json()

    def hashing():
        return next((w for w in workers(topology) if re.search(r"Task sdmerge\.hash_model\[[^\]]+\] received",
                                                               w.output())), None)

    victim = wait_for(hashing, 60, "a worker to start hashing", interval=0.01)
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait()
    assert client.get(f"/models/{model['id']}").json()["status"] == "hashing"
    ready = wait_for(lambda: (m := client.get(f"/models/{model['id']}").json())["status"] != "hashing" and m,
                     120, "the model to be hashed by the other worker")
    assert ready["status"] == "ready", ready
    survivor = next(w for w in workers(topology) if w is not victim)
    assert f"model {model['id']}: ready" in survivor.output()
    assert "'rehash'" in survivor.output()  # its unacknowledged message was taken for lost after a lease


def test_the_embedded_worker_killed_mid_merge(tmp_path, model_root):
    port = free_port()
    env = service_env(SDMERGE_JOB_LEASE_SECONDS=str(LEASE_SECONDS), SDMERGE_MERGE_THREADS="1",
                      SDMERGE_HASH_CACHE=str(tmp_path / "hashes.sqlite3"))
    server = Process([*SDMERGE, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                      "--model-root", str(model_root)], env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, server)
        with httpx.Client(base_url=base, timeout=30) as client:
            register(client, [f"sdxl-{seed}.safetensors" for seed in SLOW_SEEDS])
            job = client.post("/merges", json=SLOW_RECIPE).json()
            tmp = tmp_path / "data" / "tmp"
            wait_for(lambda: any(f"job-{job['id']}-" in p.name for p in tmp.iterdir()), 60,
                     "the child worker to be merging", interval=0.005)
            (child,) = server.children()
            subprocess.run(["kill", "-9", str(child)], check=True)
            done = wait_job(client, job["id"], timeout=120)  # the server starts a new child; the lease lapses
            assert done["status"] == "succeeded" and done["attempts"] == 2, done
            assert server.children() and server.children() != [child]
            assert len(list((tmp_path / "data" / "artifacts").rglob("*.safetensors"))) == 1
            settled(tmp_path / "data")
    finally:
        server.stop()


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie left for whoever adopted it to reap."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_embedded_serve_killed_mid_flight_and_started_again(tmp_path, model_root):
    """`sdmerge serve` SIGKILLed with a merge running in its child worker and more queued: the
    child dies with it, and once serve is started again every job completes exactly once."""
    port, data = free_port(), tmp_path / "data"
    env = service_env(SDMERGE_JOB_LEASE_SECONDS=str(LEASE_SECONDS), SDMERGE_MERGE_THREADS="1",
                      SDMERGE_HASH_CACHE=str(tmp_path / "hashes.sqlite3"))
    args = [*SDMERGE, "serve", "--port", str(port), "--data-dir", str(data), "--model-root", str(model_root)]
    base = f"http://127.0.0.1:{port}"
    servers = [Process(args, env, tmp_path / "serve.log")]
    try:
        wait_healthy(base, servers[0])
        with httpx.Client(base_url=base, timeout=30) as client:
            register(client, SLOW_RECIPE["merge"]["models"])
            jobs = [client.post("/merges", json=recipe).json() for recipe in slow_recipes(4)]
            wait_for(lambda: any("job-" in p.name for p in (data / "tmp").iterdir()), 60,
                     "the child worker to be merging", interval=0.005)
            (child,) = servers[0].children()
            servers[0].kill()
            wait_for(lambda: _gone(child), 30, "the child worker to die with serve")
            servers.append(Process(args, env, tmp_path / "serve2.log"))
            wait_healthy(base, servers[1])
            done = [wait_job(client, job["id"], timeout=180) for job in jobs]
            assert {j["status"] for j in done} == {"succeeded"}, done
            assert completions(servers) == {j["id"]: 1 for j in done}
            assert max(j["attempts"] for j in done) == 2, done  # the merge that was running, run again
            assert len(list((data / "artifacts").rglob("*.safetensors"))) == len({j["recipe_hash"] for j in done})
            settled(data)
    finally:
        for server in servers:
            server.stop()

