"""The load generator of bench/api_bench.py: N simulated clients polling `GET /merges/{id}` (and,
every Nth request, `POST /merges/plan`) for a while, with latency percentiles and the CPU the
client and the API process used.

The default client is a minimal keep-alive HTTP/1.1 client (one connection per simulated
client): a poll costs it a small fraction of httpx's CPU, so little of the measured latency is
the client's own event loop being busy; `client_kind="httpx"` uses httpx.AsyncClient.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import time
from pathlib import Path

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary(latencies: dict[str, list[float]], errors: int, seconds: float) -> dict:
    out = {"seconds": round(seconds, 2), "errors": errors,
           "throughput_rps": round(sum(len(v) for v in latencies.values()) / seconds, 1)}
    for kind, values in latencies.items():
        out[kind] = {"requests": len(values), "p50_ms": round(percentile(values, 0.50) * 1e3, 2),
                     "p99_ms": round(percentile(values, 0.99) * 1e3, 2),
                     "max_ms": round(max(values, default=float("nan")) * 1e3, 2)}
    return out


class RawClient:
    """One keep-alive HTTP/1.1 connection, written and parsed by hand: a poll costs the client a
    small fraction of what httpx's machinery costs, so the client perturbs the latency it measures
    less. Only what this bench sends and uvicorn answers (Content-Length bodies) is handled."""

    class Error(Exception):
        pass

    def __init__(self, base: str, headers: dict) -> None:
        host, _, port = base.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.prefix = f"Host: {host}:{port}\r\n{extra}".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self.prefix
        if body is not None:
            head += b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        self.writer.write(head + b"\r\n" + (body or b""))
        try:
            header = await self.reader.readuntil(b"\r\n\r\n")
            lines = header.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            content = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise RawClient.Error(type(exc).__name__) from exc
        if close:
            self.close()
        return status, content

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (from /proc; 0 where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(base: str, headers: dict, job_ids: list[int], plan_body: dict, *, clients: int,
               seconds: float, interval: float, plan_every: int, client_kind: str = "httpx",
               api_pid: int | None = None) -> dict:
    latencies: dict[str, list[float]] = {"poll": [], "plan": []}
    errors = 0
    samples: list[str] = []  # the first few failures, to say what went wrong
    plan_bytes = json.dumps(plan_body).encode()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as client:
        deadline = time.perf_counter() + seconds

        async def one_client(n: int) -> None:
            nonlocal errors
            rng = random.Random(n)
            raw = RawClient(base, headers) if client_kind == "raw" else None
            await asyncio.sleep(rng.random() * (interval or 0.05))  # spread the first wave
            i = 0
            while time.perf_counter() < deadline:
                i += 1
                kind = "plan" if plan_every and i % plan_every == 0 else "poll"
                start = time.perf_counter()
                try:
                    if raw is not None:
                        status, text = await (raw.request("POST", "/merges/plan", plan_bytes) if kind == "plan"
                                              else raw.request("GET", f"/merges/{rng.choice(job_ids)}"))
                    else:
                        response = await (client.post("/merges/plan", json=plan_body) if kind == "plan"
                                          else client.get(f"/merges/{rng.choice(job_ids)}"))
                        status, text = response.status_code, response.content
                    if status != 200:
                        errors += 1
                        samples.append(f"{kind} {status} {text[:200]!r}")
                except (httpx.HTTPError, RawClient.Error) as exc:
                    errors += 1
                    samples.append(f"{kind} {type(exc).__name__}")
                latencies[kind].append(time.perf_counter() - start)
                if interval:
                    await asyncio.sleep(interval)
            if raw is not None:
                raw.close()

        # This process has imported torch (the checkpoints): a full collection walks all of it,
        # tens of milliseconds during which no response is read. Those pauses are the client's,
        # not the server's: keep what exists out of the collector, and collect less often.
        thresholds = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        cpu, api_cpu = time.process_time(), process_cpu_seconds(api_pid) if api_pid else 0.0
        began = time.perf_counter()
        try:
            await asyncio.gather(*(one_client(n) for n in range(clients)))
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
        elapsed = time.perf_counter() - began
        usage = {"client": client_kind, "client_cpu_pct": round(100 * (time.process_time() - cpu) / elapsed, 1)}
        if api_pid:
            usage["api_cpu_pct"] = round(100 * (process_cpu_seconds(api_pid) - api_cpu) / elapsed, 1)
        return {**summary(latencies, errors, elapsed), **usage, "error_samples": samples[:3]}
