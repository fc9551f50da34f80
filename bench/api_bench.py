"""Benchmark: the REST service under 200 concurrent clients, and a merge through the service
against the same merge with the CLI, in the same run.

    scripts/services.sh run -- .venv/bin/python bench/api_bench.py      # PostgreSQL + Redis
    .venv/bin/python bench/api_bench.py --embedded                      # the default: SQLite, no broker

The service under test is real: `sdmerge serve` (API only) and one `sdmerge worker`, started
here on a fresh database and a flushed Redis database, stopped at the end; or, with
`--embedded`, `sdmerge serve` alone as a user starts it (SQLite and the filesystem broker in a
fresh data dir, its worker a child). Clients poll
`GET /merges/{id}`, in three phases: paced polls (each client waits `--interval` seconds between
requests, as a progress poller does), paced polls where every `--plan-every`-th request is a
`POST /merges/plan`, and closed-loop polls (no waiting: the saturation throughput). The client runs on the same
machine (one asyncio process), so on a small machine it competes with the server for CPU: each
phase reports the CPU the client and the API process used (`client_cpu_pct`, `api_cpu_pct`: % of
one core over the phase). The client is a minimal keep-alive HTTP/1.1 client (one connection
per simulated client), which costs a small fraction of httpx's CPU per request, so little of the
measured latency is the client's own event loop being busy (`--client httpx`: httpx.AsyncClient,
as earlier runs used); and for each phase
the client keeps its heap (torch included) out of its garbage collector, whose full passes would
otherwise stall every response in flight for tens of milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_load import load  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SDMERGE = [sys.executable, "-m", "app.cli"]


class Service:
    """`sdmerge serve` (API only) and one worker on the given database and broker; embedded,
    `sdmerge serve` alone (it runs its worker as a child)."""

    def __init__(self, workdir: Path, env: dict[str, str], port: int, api_workers: int,
                 embedded: bool = False) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.logs = []
        self.processes = []
        commands = [("serve", ["serve", "--port", str(port), "--api-workers", str(api_workers)])]
        if not embedded:
            commands.append(("worker", ["worker"]))
        for name, args in commands:
            log = open(workdir / f"{name}.log", "wb")
            self.logs.append(log)
            self.processes.append(subprocess.Popen([*SDMERGE, *args], env=env, cwd=REPO, stdout=log,
                                                   stderr=subprocess.STDOUT))
        wait(lambda: _get(f"{self.base}/health") == 200, 60, "the API")

    @property
    def api_pid(self) -> int:
        return self.processes[0].pid

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in self.logs:
            log.close()


def _get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def wait(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise SystemExit(f"api_bench: timed out waiting for {what}")


def checkpoints(cache: Path, size: str, seeds: tuple[int, ...]) -> list[Path]:
    """The engine's synthetic SD2 checkpoints, written once and shared with bench/merge_bench.py."""
    from merge_engine.synthetic import tiny_state_dict, write_checkpoint, write_full_size

    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = cache / f"sd2-{size}-seed{seed}.safetensors"
        if not path.exists():
            if size == "full":
                write_full_size(path, "sd2", seed=seed)
            else:
                write_checkpoint(path, tiny_state_dict("sd2", seed=seed))
        paths.append(path)
    return paths


def link_into(paths: list[Path], root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for path in paths:
        try:
            os.link(path, root / path.name)
        except OSError:
            shutil.copy2(path, root / path.name)


def register(client: httpx.Client, filenames: list[str]) -> None:
    ids = [client.post("/models", json={"path": f}).raise_for_status().json()["id"] for f in filenames]
    for model_id in ids:
        wait(lambda m=model_id: client.get(f"/models/{m}").json()["status"] == "ready", 600, f"model {model_id}")


def finished(client: httpx.Client, job_id: int) -> dict:
    job = wait(lambda: (j := client.get(f"/merges/{job_id}").json())["status"] not in ("queued", "running") and j,
               3600, f"job {job_id}", interval=0.02)
    if job["status"] != "succeeded":
        raise SystemExit(f"api_bench: job {job_id} {job['status']}: {job['error']}")
    return job


def compare_merge(client: httpx.Client, env: dict, workdir: Path, root: Path, names: list[str],
                  threads: int, rounds: int) -> dict:
    """The same recipe: `sdmerge merge` (a fresh process, as a user runs it) against a submission
    to the running service, from POST to `succeeded` as a client sees it. Each round uses a new
    output dtype so the service cannot answer from its dedupe; the CLI merges the same recipe."""
    timings: dict[str, list[float]] = {"cli_s": [], "cli_hash_s": [], "service_s": [], "service_worker_s": []}
    for dtype in ("fp16", "bf16", "fp32")[:rounds]:
        recipe = {"name": f"bench-{dtype}", "merge": {"method": "uniform", "models": names},
                  "output": {"dtype": dtype}}
        (workdir / "recipe.json").write_text(json.dumps(recipe))
        out = workdir / "cli.safetensors"
        # --hash: the sha256 of the output, which the service's content-addressed store needs too
        for key, extra in (("cli_s", []), ("cli_hash_s", ["--hash"])):
            start = time.perf_counter()
            subprocess.run([*SDMERGE, "merge", str(workdir / "recipe.json"), "-o", str(out), "--model-root",
                            str(root), "--threads", str(threads), "--quiet", *extra], env=env, check=True,
                           cwd=REPO, stdout=subprocess.DEVNULL)
            timings[key].append(time.perf_counter() - start)
            out.unlink()
        start = time.perf_counter()
        job = finished(client, client.post("/merges", json=recipe).raise_for_status().json()["id"])
        timings["service_s"].append(time.perf_counter() - start)
        ran = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
        timings["service_worker_s"].append(ran.total_seconds())
    median = {k: statistics.median(v) for k, v in timings.items()}
    return {"models": names, **{k: [round(v, 2) for v in vs] for k, vs in timings.items()},
            "service_over_cli": round(median["service_s"] / median["cli_s"], 3),
            "service_over_cli_hash": round(median["service_s"] / median["cli_hash_s"], 3)}


PHASES = ("paced", "plans", "closed")


class Embedded:
    """The default `sdmerge serve`: SQLite and the filesystem broker in the data dir."""

    def env(self) -> dict[str, str]:
        return {}

    def drop(self) -> None:
        pass


class PostgresRedis:
    """A fresh database on the given server and a flushed Redis database, dropped at the end."""

    def __init__(self, database_url: str, broker_url: str) -> None:
        from sqlalchemy import create_engine, text

        from app.db import normalize_url

        self.server_url = database_url
        self.database = f"sdmerge_bench_{uuid.uuid4().hex[:8]}"
        self.admin = create_engine(normalize_url(database_url), isolation_level="AUTOCOMMIT")
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.database}"'))
        import redis

        self.broker = broker_url.rsplit("/", 1)[0] + "/5"
        self.redis = redis.Redis.from_url(self.broker)
        self.redis.flushdb()

    def env(self) -> dict[str, str]:
        return {"SDMERGE_DATABASE_URL": self.server_url.rsplit("/", 1)[0] + "/" + self.database,
                "SDMERGE_BROKER_URL": self.broker}

    def drop(self) -> None:
        from sqlalchemy import text

        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
        self.redis.flushdb()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embedded", action="store_true",
                   help="the embedded default instead: SQLite and the filesystem broker in a fresh data dir")
    p.add_argument("--database-url", default=os.environ.get("SDMERGE_TEST_POSTGRES_URL"),
                   help="a PostgreSQL server URL; a fresh database is created on it and dropped")
    p.add_argument("--broker-url", default=os.environ.get("SDMERGE_TEST_REDIS_URL"))
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between a paced client's requests")
    p.add_argument("--plan-every", type=int, default=10, help="every Nth request is POST /merges/plan")
    p.add_argument("--api-workers", type=int, default=1, help="API processes (sdmerge serve --api-workers)")
    p.add_argument("--merge-size", choices=("full", "tiny", "none"), default="full")
    p.add_argument("--threads", type=int, default=2, help="merge threads for the CLI and the worker")
    p.add_argument("--merge-rounds", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="the load client: a minimal keep-alive HTTP/1.1 client (default), or "
                        "httpx.AsyncClient (as earlier runs; several times the client's CPU)")
    p.add_argument("--cache-dir", type=Path, default=BENCH / ".cache")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if not args.embedded and (not args.database_url or not args.broker_url):
        raise SystemExit("api_bench: needs PostgreSQL and Redis: run it under scripts/services.sh, "
                         "or pass --embedded")
    backend = Embedded() if args.embedded else PostgresRedis(args.database_url, args.broker_url)
    workdir = Path(tempfile.mkdtemp(prefix="sdmerge-bench-"))
    root = workdir / "models"
    tiny = checkpoints(args.cache_dir, "tiny", (0, 1))
    full = checkpoints(args.cache_dir, "full", (0, 1)) if args.merge_size == "full" else []
    link_into(tiny + full, root)
    env = {**os.environ, "SDMERGE_DATA_DIR": str(workdir / "data"),
           "SDMERGE_MODEL_ROOTS": str(root), "SDMERGE_MERGE_THREADS": str(args.threads),
           "SDMERGE_HASH_CACHE": str(workdir / "hashes.sqlite3"), "PYTHONPATH": str(REPO)}
    for name in ("SDMERGE_API_TOKEN", "SDMERGE_DATABASE_URL", "SDMERGE_BROKER_URL"):
        env.pop(name, None)
    env.update(backend.env())
    if not args.embedded:
        subprocess.run([*SDMERGE, "db", "upgrade"], env=env, check=True, capture_output=True)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    service = Service(workdir, env, port, args.api_workers, embedded=args.embedded)
    results: dict = {"backend": "embedded (SQLite)" if args.embedded else "PostgreSQL + Redis",
                     "clients": args.clients, "cpus": os.cpu_count(), "api_workers": args.api_workers,
                     "client": args.client, "load_average_at_start": os.getloadavg()}
    try:
        with httpx.Client(base_url=service.base, timeout=60) as client:
            register(client, [p.name for p in tiny])
            a, b = (p.name for p in tiny)
            seeds = [client.post("/merges", json={"merge": {"method": "weighted", "models": [
                {"model": a, "weight": i + 1}, {"model": b, "weight": 20 - i}]}}).json()["id"] for i in range(20)]
            for job_id in seeds:
                finished(client, job_id)
            plan_body = {"merge": {"method": "uniform", "models": [a, b]}}
            phases = {"paced": ("paced_polls_only", args.interval, 0),
                      "plans": ("paced_with_plans", args.interval, args.plan_every),
                      "closed": ("closed_loop_polls_only", 0.0, 0)}
            for phase, interval, plan_every in (phases[name] for name in PHASES if name in args.phases):
                results[phase] = asyncio.run(load(service.base, {}, seeds, plan_body, clients=args.clients,
                                                  seconds=args.seconds, interval=interval, plan_every=plan_every,
                                                  client_kind=args.client, api_pid=service.api_pid))
                results[phase].update(interval_s=interval, plan_every=plan_every)
                print(phase, json.dumps(results[phase]), flush=True)
            if full:
                register(client, [p.name for p in full])
                results["merge"] = compare_merge(client, env, workdir, root, [p.name for p in full], args.threads,
                                                 args.merge_rounds)
                print("merge", json.dumps(results["merge"]), flush=True)
    finally:
        service.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        backend.drop()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
