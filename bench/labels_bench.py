"""Benchmark: what the ModelSpec hash costs a merge. See docs/BENCHMARKS.md.

    .venv/bin/python bench/labels_bench.py --n 2 4 --repeat 3

For N full-size synthetic SD1.5 fp16 checkpoints, a uniform merge is timed three ways, in one
run, alternating, each in a fresh process (warm page cache for the inputs):

* `plain`: `output.modelspec` off, the whole file's sha256 computed from the blocks as they are
  written (the baseline: the service's merge before the labels);
* `sealed`: labels on, AutoV3 computed from the blocks as written and sealed into the header,
  then the whole file's sha256 read back (what the service does now);
* `sealed-nohash`: labels on, no whole-file sha256 asked (the CLI's default).

Ratios are against `plain` in the same run; the median of `--repeat` runs each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = {"plain": (False, True), "sealed": (True, True), "sealed-nohash": (True, False)}

ONE_MERGE = """
import json, sys, time
from merge_engine.execute import merge
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver
models, out, modelspec, sha = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
recipe = parse_recipe({"merge": {"method": "uniform", "models": models}, "output": {"modelspec": modelspec}})
started = time.perf_counter()
p = plan(recipe, FileResolver("/"))
try:
    result = merge(p, out, compute_sha256=sha, overwrite=True)
finally:
    p.close()
print(json.dumps({"seconds": time.perf_counter() - started, "sha256": result.sha256, "autov3": result.autov3}))
"""


def models(folder: Path, n: int) -> list[str]:
    from merge_engine.synthetic import write_full_size

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(n):
        path = folder / f"sd1-{seed}.safetensors"
        if not path.exists():
            write_full_size(path, "sd1", seed=seed)
        paths.append(str(path))
    return paths


def warm(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def run_case(paths: list[str], out: Path, case: str) -> float:
    modelspec, sha = CASES[case]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", ONE_MERGE, json.dumps(paths), str(out), str(int(modelspec)),
                           str(int(sha))], env=env, check=True, capture_output=True, text=True)
    out.unlink()
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sdmerge-bench-labels"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    for n in args.n:
        paths = models(args.dir / "models", n)
        times: dict[str, list[float]] = {case: [] for case in CASES}
        for _ in range(args.repeat):
            for case in CASES:  # alternating, so drift on a noisy machine hits every case alike
                warm(paths)
                times[case].append(run_case(paths, args.dir / "out.safetensors", case))
        medians = {case: statistics.median(t) for case, t in times.items()}
        results[n] = {"seconds": medians, "over_plain": {c: medians[c] / medians["plain"] for c in CASES}}
        print(f"N={n}: " + ", ".join(f"{c} {medians[c]:.2f} s ({medians[c] / medians['plain']:.2f}x)" for c in CASES),
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}, indent=2))


if __name__ == "__main__":
    main()
