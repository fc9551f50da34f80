"""Benchmark: what hostile requests cost the running service (`sdmerge serve`, embedded), against
the same service's idle `/health` in the same run.

    .venv/bin/python bench/hostile_bench.py [--json out.json]

Sends, one after the other: a 100 MB JSON body of 6.5 M model references to `/merges/plan`
(refused before parsing), the same body within a raised cap (decoded and refused by the recipe's
caps), and three uploads of 90 MB safetensors header bombs (1.6 M zero-size tensors; a 47 M-long
shape), while a second connection polls `/health` every 50 ms. Reports each request's time and
status, the API process's RSS growth, and the worst `/health` latency against its idle baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SDMERGE = [sys.executable, "-m", "app.cli"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bombs(folder: Path) -> dict[str, Path]:
    one = b'"t%07d":{"dtype":"F16","shape":[0],"data_offsets":[0,0]},'
    many = b"{" + b"".join(one % i for i in range(1_600_000))[:-1] + b"}"
    shape = b'{"a":{"dtype":"F16","shape":[' + b"0," * 47_000_000 + b'0],"data_offsets":[0,0]}}'
    out = {}
    for name, text in (("tensors", many), ("shape", shape)):
        out[name] = folder / f"{name}.safetensors"
        out[name].write_bytes(len(text).to_bytes(8, "little") + text)
    return out


def serve(workdir: Path, port: int, max_json: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SDMERGE_DATA_DIR": str(workdir / "data"),
           "SDMERGE_MAX_JSON_BYTES": str(max_json), "SDMERGE_MAX_UPLOAD_BYTES": str(1 << 30)}
    process = subprocess.Popen([*SDMERGE, "serve", "--port", str(port)], env=env, cwd=REPO,
                               stdout=open(workdir / f"serve-{port}.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("hostile_bench: the server did not start")


def health_poller(base: str, stop: threading.Event, seen: list[float]) -> None:
    with httpx.Client(base_url=base, timeout=60) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get("/health")
            seen.append(time.perf_counter() - started)
            time.sleep(0.05)


def attack(base: str, pid: int, name: str, send) -> dict:
    seen, stop = [], threading.Event()
    poller = threading.Thread(target=health_poller, args=(base, stop, seen))
    poller.start()
    before = rss_mib(pid)
    started = time.perf_counter()
    response = send()
    elapsed = time.perf_counter() - started
    time.sleep(0.3)
    stop.set()
    poller.join()
    return {"attack": name, "status": response.status_code, "code": response.json()["error"]["code"],
            "seconds": round(elapsed, 3), "api_rss_growth_mib": round(rss_mib(pid) - before, 1),
            "health_worst_ms": round(max(seen) * 1e3, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sdmerge-hostile-"))
    files = bombs(workdir)
    body = json.dumps({"merge": {"method": "uniform", "models": ["m.safetensors"] * 6_500_000}}).encode()
    results, servers = [], []
    try:
        for max_json in (8 << 20, 256 << 20):
            port = 18000 + len(servers)
            servers.append(serve(workdir, port, max_json))
            base, pid = f"http://127.0.0.1:{port}", servers[-1].pid
            with httpx.Client(base_url=base, timeout=600) as client:
                idle = []
                for _ in range(20):
                    started = time.perf_counter()
                    client.get("/health")
                    idle.append(time.perf_counter() - started)
                cap = f"cap {max_json >> 20} MiB"
                results.append({"attack": f"idle /health ({cap})", "health_worst_ms": round(max(idle) * 1e3, 1),
                                "api_rss_mib": round(rss_mib(pid), 1)})
                results.append(attack(base, pid, f"100 MB body to /merges/plan ({cap})", lambda c=client: c.post(
                    "/merges/plan", content=body, headers={"content-type": "application/json"})))
                if max_json == 8 << 20:
                    for n, (kind, path) in enumerate([*files.items(), ("tensors again", files["tensors"])]):
                        results.append(attack(base, pid, f"90 MB header bomb upload ({kind})", lambda c=client, p=path, n=n:
                                              c.put(f"/models/upload/bomb{n}.safetensors", content=p.read_bytes())))
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    for row in results:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
