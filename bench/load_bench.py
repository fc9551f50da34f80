"""Benchmark: 50 clients submitting overlapping recipes and polling their jobs for two minutes
against the scale-out topology (PostgreSQL, Redis, one API, two workers), with bursts where every
client submits at once. It checks, and exits non-zero otherwise, that every distinct recipe was
merged exactly once (by the workers' own logs), that no request failed (no 5xx, no lost job) and
that dedupe held (every submission of a recipe answered its one job); it reports poll latency
overall and during the submit bursts.

    scripts/services.sh run -- .venv/bin/python bench/load_bench.py [--seconds 120] [--json out.json]

The servers are real: `sdmerge serve` (API only) and two `sdmerge worker`s, on a fresh database and
a flushed Redis database, stopped at the end; the models are tiny SD2-shaped checkpoints. The
client is bench/api_load.py's lean keep-alive HTTP/1.1 client, one connection per simulated
client, in one asyncio process on the same machine (so on a 2-core machine it competes with the
servers for the CPU: its own CPU use is reported).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_bench import PostgresRedis, checkpoints, link_into, register  # noqa: E402
from api_load import RawClient, percentile, process_cpu_seconds  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SDMERGE = [sys.executable, "-m", "app.cli"]
MODELS = 6
TERMINAL = (b'"status":"succeeded"', b'"status":"failed"', b'"status":"cancelled"')


def recipes(names: list[str], count: int) -> list[dict]:
    """`count` distinct weighted merges of overlapping subsets of the models."""
    rng, out, seen = random.Random(7), [], set()
    while len(out) < count:
        chosen = tuple(sorted(rng.sample(range(len(names)), rng.randint(2, 4))))
        weights = tuple(rng.randint(1, 4) for _ in chosen)
        if (chosen, weights) in seen:
            continue
        seen.add((chosen, weights))
        out.append({"merge": {"method": "weighted", "models": [
            {"model": names[i], "weight": w} for i, w in zip(chosen, weights, strict=True)]}})
    return out


class Topology:
    def __init__(self, workdir: Path, env: dict[str, str], port: int) -> None:
        self.base, self.logs, self.processes = f"http://127.0.0.1:{port}", {}, {}
        subprocess.run([*SDMERGE, "db", "upgrade"], env=env, cwd=REPO, check=True, capture_output=True)
        for name, args in (("api", ["serve", "--port", str(port)]), ("worker1", ["worker"]), ("worker2", ["worker"])):
            self.logs[name] = workdir / f"{name}.log"
            self.processes[name] = subprocess.Popen([*SDMERGE, *args], env=env, cwd=REPO,
                                                    stdout=open(self.logs[name], "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("load_bench: the API did not become ready")

    def completions(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for name in ("worker1", "worker2"):
            for job_id in re.findall(r"job (\d+): succeeded", self.logs[name].read_text(errors="replace")):
                counts[int(job_id)] = counts.get(int(job_id), 0) + 1
        return counts

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


async def run_clients(base: str, pool: list[dict], clients: int, seconds: float, burst_every: float,
                      burst_window: float, api_pid: int) -> dict:
    polls, burst_polls, submits = [], [], []
    errors, samples = 0, []
    answers: dict[int, set[int]] = {}  # recipe index -> job ids it was answered with
    bodies = [json.dumps(r).encode() for r in pool]
    began = time.perf_counter()
    deadline = began + seconds
    bursts = [burst_every * (k + 0.5) for k in range(int(seconds / burst_every))]

    def in_burst(t: float) -> bool:
        return any(b <= t - began < b + burst_window for b in bursts)

    async def client(n: int) -> None:
        nonlocal errors
        rng, raw = random.Random(n), RawClient(base, {})
        job, handled = None, 0
        await asyncio.sleep(rng.random())
        while time.perf_counter() < deadline:
            due = handled < len(bursts) and time.perf_counter() - began >= bursts[handled]
            if due or job is None:
                handled += due
                index = rng.randrange(len(pool))
                start = time.perf_counter()
                try:
                    status, text = await raw.request("POST", "/merges", bodies[index])
                except RawClient.Error as exc:
                    status, text = 0, str(exc).encode()
                submits.append(time.perf_counter() - start)
                if status not in (200, 202):
                    errors += 1
                    samples.append(f"submit {status} {text[:200]!r}")
                else:
                    job = json.loads(text)["id"]
                    answers.setdefault(index, set()).add(job)
            start = time.perf_counter()
            try:
                status, text = await raw.request("GET", f"/merges/{job}")
            except RawClient.Error as exc:
                status, text = 0, str(exc).encode()
            elapsed = time.perf_counter() - start
            (burst_polls if in_burst(start) else polls).append(elapsed)
            if status != 200:
                errors += 1
                samples.append(f"poll {status} {text[:200]!r}")
            elif any(marker in text for marker in TERMINAL):
                if b'"status":"succeeded"' not in text:
                    errors += 1
                    samples.append(f"job {job} ended {text[:300]!r}")
                job = None
                await asyncio.sleep(rng.random() * 2)  # a user looks at the result, then submits again
                continue
            await asyncio.sleep(0.1)
        raw.close()

    gc.collect()
    gc.freeze()  # the client's own collector pauses are not the server's latency
    cpu, api_cpu = time.process_time(), process_cpu_seconds(api_pid)
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - began
    gc.unfreeze()

    def stats(values: list[float]) -> dict:
        return {"requests": len(values), "p50_ms": round(percentile(values, 0.5) * 1e3, 2),
                "p99_ms": round(percentile(values, 0.99) * 1e3, 2),
                "max_ms": round(max(values, default=float("nan")) * 1e3, 2)}

    return {"seconds": round(elapsed, 1), "errors": errors, "error_samples": samples[:5],
            "polls": stats(polls + burst_polls), "polls_outside_bursts": stats(polls),
            "polls_during_bursts": stats(burst_polls), "submits": stats(submits), "bursts": len(bursts),
            "client_cpu_pct": round(100 * (time.process_time() - cpu) / elapsed, 1),
            "api_cpu_pct": round(100 * (process_cpu_seconds(api_pid) - api_cpu) / elapsed, 1),
            "answers": {str(k): sorted(v) for k, v in answers.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--recipes", type=int, default=40, help="distinct recipes the clients choose from")
    parser.add_argument("--burst-every", type=float, default=15, help="seconds between bursts of submits")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    database, broker = os.environ.get("SDMERGE_TEST_POSTGRES_URL"), os.environ.get("SDMERGE_TEST_REDIS_URL")
    if not database or not broker:
        raise SystemExit("load_bench: run it under scripts/services.sh run -- (PostgreSQL and Redis)")
    servers = PostgresRedis(database, broker)
    workdir = Path(tempfile.mkdtemp(prefix="sdmerge-load-"))
    paths = checkpoints(BENCH / ".cache", "tiny", tuple(range(1, MODELS + 1)))
    link_into(paths, workdir / "models")
    env = {**os.environ, **servers.env(), "SDMERGE_DATA_DIR": str(workdir / "data"),
           "SDMERGE_MODEL_ROOTS": str(workdir / "models"), "SDMERGE_MERGE_THREADS": "1",
           "SDMERGE_HASH_CACHE": str(workdir / "hashes.sqlite3"), "PYTHONPATH": str(REPO)}
    port = _free_port()
    topology = Topology(workdir, env, port)
    try:
        names = [p.name for p in paths]
        with httpx.Client(base_url=topology.base, timeout=60) as client:
            register(client, names)
            pool = recipes(names, args.recipes)
            result = asyncio.run(run_clients(topology.base, pool, args.clients, args.seconds, args.burst_every,
                                             2.0, topology.processes["api"].pid))
            jobs = _all_jobs(client)
            for job in jobs:  # let what is still running finish
                _wait(client, job["id"])
            jobs = _all_jobs(client)
        completions = topology.completions()
    finally:
        topology.stop()
        servers.drop()
    answers = result.pop("answers")
    by_recipe: dict[str, list[int]] = {}
    for job in jobs:
        by_recipe.setdefault(job["recipe_hash"], []).append(job["id"])
    problems = []
    if result["errors"]:
        problems.append(f"{result['errors']} failed requests: {result['error_samples']}")
    if any(len(ids) != 1 for ids in by_recipe.values()):
        problems.append(f"a recipe has several jobs: {[ids for ids in by_recipe.values() if len(ids) != 1]}")
    if any(len(ids) != 1 for ids in answers.values()):
        problems.append("dedupe did not hold: a recipe was answered with several jobs")
    if completions != {job["id"]: 1 for job in jobs}:
        problems.append(f"merged more or less than once: {completions}")
    if any(job["status"] != "succeeded" for job in jobs):
        problems.append("a job did not succeed")
    report = {"clients": args.clients, "distinct_recipes_submitted": len(answers), "jobs": len(jobs),
              "merged_exactly_once": not problems, **result, "problems": problems}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if problems else 0


def _all_jobs(client: httpx.Client) -> list[dict]:
    jobs, cursor = [], None
    while True:
        page = client.get("/merges", params={"limit": 500, **({"cursor": cursor} if cursor else {})}).json()
        jobs += page["items"]
        cursor = page["next"]
        if cursor is None:
            return jobs


def _wait(client: httpx.Client, job_id: int) -> None:
    deadline = time.monotonic() + 300
    while client.get(f"/merges/{job_id}").json()["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise SystemExit(f"load_bench: job {job_id} did not finish")
        time.sleep(0.2)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
