"""Benchmark: `sdmerge analyze` (one streaming pass, Gram matrices) against one plain read of the
same files and the naive pairwise analysis, on full-size synthetic SD2.1 fp16 checkpoints.

    .venv/bin/python bench/analysis_bench.py --n 8 --json analysis-bench.json

Inputs, caching, hard links and the measuring wrapper are merge_bench.py's (see bench/README.md).
Each competitor runs in a fresh process under that wrapper, after the page cache is warmed:

* `read`: every tensor's bytes read once into a 16 MiB buffer (the floor for any analysis);
* `sdmerge`: `sdmerge analyze FILE... -o OUT --no-hash --quiet`, all components, both metrics;
* `pairwise`: for each pair, `safe_open` both files and sum (a-b)², a·b, a², b² per key in fp64.

Targets (issue 5): sdmerge within 1.5x of `read`, at least 4x faster than `pairwise`, peak RSS
under 1.5 GiB. The pairwise L2 matrix is compared with sdmerge's (relative 1e-9).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import (  # noqa: E402
    BENCH,
    REPO,
    SDMERGE,
    VENV_PYTHON,
    machine_info,
    measured,
    prepare_inputs,
    warm,
)

TARGETS = {"read_ratio": 1.5, "pairwise_ratio": 4.0, "rss_mib": 1536.0}


def _read(argv: list[str]) -> int:
    """`_read FILE...`: read every byte of every file once (no torch)."""
    buffer, total = bytearray(16 << 20), 0
    for path in argv:
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(buffer):
                total += got
    print(json.dumps({"bytes": total}))
    return 0


def _pairwise(argv: list[str]) -> int:
    """`_pairwise OUT.json FILE...`: the naive way, each pair reading both files, fp64 sums."""
    from safetensors import safe_open

    out, paths = argv[0], argv[1:]
    n = len(paths)
    l2 = [[0.0] * n for _ in range(n)]
    cosine = [[1.0] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        with safe_open(paths[i], "pt") as fa, safe_open(paths[j], "pt") as fb:
            d2 = dot = na = nb = 0.0
            for key in fa.keys():
                a = fa.get_tensor(key)
                if not a.is_floating_point():
                    continue
                a, b = a.double(), fb.get_tensor(key).double()
                d2 += float(((a - b) ** 2).sum())
                dot += float((a * b).sum())
                na += float((a * a).sum())
                nb += float((b * b).sum())
        l2[i][j] = l2[j][i] = d2**0.5
        cosine[i][j] = cosine[j][i] = dot / (na * nb) ** 0.5
    Path(out).write_text(json.dumps({"l2": l2, "cosine": cosine}))
    return 0


def command_for(name: str, inputs: list[Path], work: Path, args: argparse.Namespace) -> list[str]:
    files = [str(p) for p in inputs]
    if name == "read":
        return [sys.executable, str(Path(__file__)), "_read", *files]
    if name == "sdmerge":
        threads = ["--threads", str(args.threads)] if args.threads else []
        return [str(SDMERGE), "analyze", *files, "-o", str(work / "report"), "--no-hash", "--quiet", *threads]
    return [str(VENV_PYTHON), str(Path(__file__)), "_pairwise", str(work / "pairwise.json"), *files]


def run(name: str, inputs: list[Path], work: Path, args: argparse.Namespace) -> dict:
    if name == "sdmerge":
        shutil.rmtree(work / "report", ignore_errors=True)
    warm(inputs)
    load = os.getloadavg()[0]
    result = measured(command_for(name, inputs, work, args), work / f"{name}.log")
    result["load_before"] = load
    print(f"  {name:<9} {result['wall_s']:8.2f} s wall {result['cpu_s']:8.2f} s cpu  peak RSS "
          f"{result['maxrss_mib']:7.0f} MiB (anon {result['peak_anon_mib']:.0f})  load {load:.1f}", flush=True)
    return result


def agreement(work: Path) -> float:
    ours = json.loads((work / "report" / "analysis.json").read_text())["components"]
    theirs = json.loads((work / "pairwise.json").read_text())["l2"]
    import math

    total = [[math.sqrt(sum(c["l2"][i][j] ** 2 for c in ours.values())) for j in range(len(theirs))]
             for i in range(len(theirs))]
    scale = max(max(row) for row in theirs)
    return max(abs(total[i][j] - theirs[i][j]) for i in range(len(theirs)) for j in range(len(theirs))) / scale


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="models (default 8)")
    p.add_argument("--small", action="store_true", help="tiny SD2-shaped checkpoints, checks the plumbing")
    p.add_argument("--distinct", type=int, default=0, help="distinct files; more inputs are hard links")
    p.add_argument("--threads", type=int, default=0, help="sdmerge analyze --threads")
    p.add_argument("--only", nargs="+", choices=["read", "sdmerge", "pairwise"],
                   default=["read", "sdmerge", "pairwise"])
    p.add_argument("--cache-dir", type=Path, default=BENCH / ".cache")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.n, args.mecha_python, args.repeat = [args.n], sys.executable, 1  # what merge_bench's helpers read
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cache = args.cache_dir.resolve()
    work = cache / ("analysis-small" if args.small else "analysis")
    work.mkdir(parents=True, exist_ok=True)
    only, args.only = args.only, []
    info = machine_info(args)
    print(f"machine: {info}", flush=True)
    inputs, distinct = prepare_inputs(args, cache)
    print(f"{len(inputs)} inputs ({distinct} distinct files, the rest hard links), "
          f"{sum(p.stat().st_size for p in inputs) / 1e9:.1f} GB", flush=True)
    results = {name: run(name, inputs, work, args) for name in only}
    ratios, targets = {}, {}
    if "sdmerge" in results:
        base = results["sdmerge"]["wall_s"]
        targets["sdmerge peak RSS < 1.5 GiB"] = results["sdmerge"]["maxrss_mib"] < TARGETS["rss_mib"]
        if "read" in results:
            ratios["sdmerge_over_read"] = base / results["read"]["wall_s"]
            targets["sdmerge within 1.5x of one plain read"] = ratios["sdmerge_over_read"] <= TARGETS["read_ratio"]
        if "pairwise" in results:
            ratios["pairwise_over_sdmerge"] = results["pairwise"]["wall_s"] / base
            ratios["pairwise_over_sdmerge_cpu"] = results["pairwise"]["cpu_s"] / results["sdmerge"]["cpu_s"]
            targets["sdmerge >= 4x faster than pairwise"] = ratios["pairwise_over_sdmerge"] >= TARGETS["pairwise_ratio"]
            ratios["l2_max_relative_difference"] = agreement(work)
            targets["sdmerge L2 == pairwise L2 (1e-9 relative)"] = ratios["l2_max_relative_difference"] < 1e-9
    for name, value in ratios.items():
        print(f"  {name:<32} {value:.4g}")
    for name, ok in targets.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    if args.json:
        command = " ".join([os.path.relpath(sys.executable, REPO), "bench/analysis_bench.py", *argv])
        args.json.write_text(json.dumps({"command": command, "machine": info, "distinct_files": distinct,
                                         "inputs": len(inputs), "runs": results, "ratios": ratios,
                                         "targets": targets}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    helpers = {"_read": _read, "_pairwise": _pairwise}
    if len(sys.argv) > 1 and sys.argv[1] in helpers:
        sys.exit(helpers[sys.argv[1]](sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
