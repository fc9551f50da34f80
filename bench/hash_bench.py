"""Benchmark: the cost of CRC32 and BLAKE3 in the hashing read, against the digest set before them.

    .venv/bin/python bench/hash_bench.py                      # a 2 GiB file under /tmp/hash-bench
    .venv/bin/python bench/hash_bench.py --gib 0.25 --repeat 5

One safetensors file (one U8 tensor of random bytes, so every digest sees data, not zeros) is
written once, read once to warm the page cache, then hashed in the same run by:

| name | what runs |
|---|---|
| `before` | the digest set before CRC32 and BLAKE3: one read, whole-file sha256 on a worker thread, data-section sha256 (AutoV3) on the reading thread (the previous `compute_hashes`, copied here) |
| `engine` | `merge_engine.hashing.compute_hashes`: the same read with CRC32 and BLAKE3 added on threads |
| `passes` | the obvious way to add them: `before`, then one more read for CRC32 and one for BLAKE3 |

Each is timed `--repeat` times (median reported). The figure of merit is `engine / before` (the
target: at most 1.25 on a machine with a core per digest; it is the slowest digest that sets
the pace, sha256 at ~0.5-2 GB/s, BLAKE3 and CRC32 are several times faster).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blake3 import blake3  # noqa: E402

from merge_engine.hashing import CHUNK, compute_hashes  # noqa: E402


def write_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size >= size:
        return
    header = json.dumps({"weights": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".partial"), "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        left = size
        while left:
            out.write(os.urandom(min(64 << 20, left)))
            left -= min(64 << 20, left)
    os.replace(path.with_suffix(".partial"), path)


def before(fd: int, size: int) -> tuple[str, str]:
    full, after_header = hashlib.sha256(), hashlib.sha256()
    data_start = 8 + struct.unpack("<Q", os.pread(fd, 8, 0))[0]
    pos = 0
    with ThreadPoolExecutor(1) as pool:
        while chunk := os.pread(fd, CHUNK, pos):
            pending = pool.submit(full.update, chunk)
            if pos + len(chunk) > data_start:
                after_header.update(memoryview(chunk)[max(0, data_start - pos):])
            pending.result()
            pos += len(chunk)
    return full.hexdigest(), after_header.hexdigest()


def passes(fd: int, size: int) -> tuple[str, str, str, str]:
    sha, v3 = before(fd, size)
    crc, pos = 0, 0
    while chunk := os.pread(fd, CHUNK, pos):
        crc, pos = zlib.crc32(chunk, crc), pos + len(chunk)
    b3, pos = blake3(), 0
    while chunk := os.pread(fd, CHUNK, pos):
        b3.update(chunk)
        pos += len(chunk)
    return sha, v3, f"{crc:08x}", b3.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="tensor data size in GiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hash-bench"))
    args = parser.parse_args()
    size = int(args.gib * (1 << 30))
    path = args.work / f"random-{size}.safetensors"
    write_file(path, size)
    fd = os.open(path, os.O_RDONLY)
    try:
        total = os.fstat(fd).st_size
        runs = {"before": lambda: before(fd, total), "engine": lambda: compute_hashes(fd, True, total),
                "passes": lambda: passes(fd, total)}
        results = {name: run() for name, run in runs.items()}  # warms the page cache; checks agreement
        engine = results["engine"]
        assert (engine.sha256, engine.autov3) == results["before"] == results["passes"][:2]
        assert (engine.crc32, engine.blake3) == results["passes"][2:]
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeat):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    finally:
        os.close(fd)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"file {total / (1 << 30):.2f} GiB, {os.cpu_count()} CPUs, median of {args.repeat}")
    for name, seconds in median.items():
        print(f"  {name:7s} {seconds:7.2f} s  {total / seconds / 1e9:5.2f} GB/s  x{seconds / median['before']:.2f}")
    print(f"engine / before = {median['engine'] / median['before']:.2f}   passes / before = "
          f"{median['passes'] / median['before']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
