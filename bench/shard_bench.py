"""Benchmark: one merge split into shards across 1, 2 and 3 worker processes on this machine,
and the cost model that predicts the speed-up on k machines. See docs/BENCHMARKS.md.

    PYTHONPATH=. .venv/bin/python bench/shard_bench.py --models 4 --processes 1 2 3

Inputs are synthetic SD2-shaped checkpoints (the text encoder and VAE at full size, fp16: 0.86
GB each), generated once into --cache. Each run plans the uniform merge, creates the shared
partial file, starts k processes (each plans on its own and writes one of k shards with
`merge_engine.shards.write_shard`), waits for them, and runs the final step (`finish_sharded`:
header, every shard's digest checked, the file's sha256 read back in file order). The one-task
`merge()` of the same plan runs in the same session, in a process of its own, as the baseline.
Wall times are the best of --repeat, page cache warm; ratios are against the 1-process run of
this same session. Every output is compared with the one-task merge's sha256.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def _generate(cache: Path, count: int) -> list[Path]:
    from merge_engine.synthetic import write_full_size

    paths = []
    for seed in range(count):
        path = cache / f"sd2-te-vae-{seed}.safetensors"
        if not path.exists():
            started = time.perf_counter()
            write_full_size(path, "sd2", seed=seed, components=("text_encoder", "vae"))
            print(f"generated {path.name} in {time.perf_counter() - started:.1f} s", flush=True)
        paths.append(path)
    return paths


def _plan(recipe_path: Path):
    from merge_engine.plan import plan
    from merge_engine.recipe import parse_recipe
    from merge_engine.resolve import FileResolver

    return plan(parse_recipe(json.loads(recipe_path.read_text())), FileResolver(recipe_path.parent))


def _shard_main(argv: list[str]) -> int:
    """`_shard RECIPE PARTIAL COUNT INDEX THREADS`: plan, write shard INDEX of COUNT; print its time."""
    from merge_engine.execute import ExecOptions
    from merge_engine.shards import split, write_shard

    recipe, partial, count, index, threads = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    started = time.perf_counter()
    merge_plan = _plan(recipe)
    try:
        planned = time.perf_counter()
        shard = split(merge_plan, count)[index]
        write_shard(merge_plan, partial, shard, options=ExecOptions(threads=threads))
    finally:
        merge_plan.close()
    done = time.perf_counter()
    print(json.dumps({"plan_s": planned - started, "write_s": done - planned, "bytes_to_read": shard.bytes_to_read}))
    return 0


def _one_task_main(argv: list[str]) -> int:
    """`_one RECIPE OUTPUT THREADS`: the plain one-task merge (sha256 while writing)."""
    from merge_engine.execute import ExecOptions, merge

    recipe, output, threads = Path(argv[0]), Path(argv[1]), int(argv[2])
    merge_plan = _plan(recipe)
    try:
        result = merge(merge_plan, output, options=ExecOptions(threads=threads), compute_sha256=True, overwrite=True)
    finally:
        merge_plan.close()
    print(json.dumps({"sha256": result.sha256}))
    return 0


def _child(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, env=env, text=True)


def one_task(recipe: Path, work: Path, threads: int) -> tuple[float, str]:
    started = time.perf_counter()
    child = _child("_one", str(recipe), str(work / "one.safetensors"), str(threads))
    out, _ = child.communicate()
    wall = time.perf_counter() - started
    assert child.returncode == 0, out
    (work / "one.safetensors").unlink()
    return wall, json.loads(out.splitlines()[-1])["sha256"]


def sharded(recipe: Path, work: Path, processes: int, threads: int) -> dict:
    from merge_engine.shards import finish_sharded, prepare_partial, split

    started = time.perf_counter()
    merge_plan = _plan(recipe)
    try:
        shards = split(merge_plan, processes)
        partial = prepare_partial(merge_plan, work / f"shared-{processes}.partial")
        children = [_child("_shard", str(recipe), str(partial), str(processes), str(i), str(threads))
                    for i in range(processes)]
        reports = []
        for child in children:
            out, _ = child.communicate()
            assert child.returncode == 0, out
            reports.append(json.loads(out.splitlines()[-1]))
        written = time.perf_counter()
        result = finish_sharded(merge_plan, partial, work / f"sharded-{processes}.safetensors", shards,
                                overwrite=True)
        finished = time.perf_counter()
    finally:
        merge_plan.close()
    result.path.unlink()
    return {"processes": processes, "wall_s": finished - started, "shards_s": written - started,
            "final_s": finished - written, "sha256": result.sha256, "shard_reports": reports,
            "output_bytes": result.size}


def predicted_speedup(k: int, read_bytes: float, output_bytes: float, read_rate: float, final_rate: float,
                      fixed_s: float) -> float:
    """The cost model (docs/BENCHMARKS.md): k machines each read R/k at their own rate B, then one
    reads the output back twice at F (the data's AutoV3 with the shards' digests, sealed into the
    header, then the whole file's sha256); against one machine's one-task merge, which hashes the
    data while writing and reads the output back once after the seal:
    (s + R/B + W/F) / (s + R/(k B) + 2 W/F)."""
    one = fixed_s + read_bytes / read_rate + output_bytes / final_rate
    return one / (fixed_s + read_bytes / (k * read_rate) + 2 * output_bytes / final_rate)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_shard":
        return _shard_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        return _one_task_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=1, help="merge threads per process")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sdmerge-shard-bench"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SDMERGE_HASH_CACHE", str(args.cache / "hashes.sqlite3"))
    paths = _generate(args.cache, args.models)
    recipe = args.cache / f"uniform-{args.models}.json"
    recipe.write_text(json.dumps({"merge": {"method": "uniform", "models": [p.name for p in paths]}}))
    work = args.cache / "work"
    work.mkdir(exist_ok=True)
    one_task(recipe, work, args.threads)  # hashes the inputs once (cached) and warms the page cache
    baseline = min((one_task(recipe, work, args.threads) for _ in range(args.repeat)), key=lambda r: r[0])
    print(f"one-task merge: {baseline[0]:.2f} s", flush=True)
    runs = {}
    for k in args.processes:
        runs[k] = min((sharded(recipe, work, k, args.threads) for _ in range(args.repeat)), key=lambda r: r["wall_s"])
        assert runs[k]["sha256"] == baseline[1], f"{k} processes wrote other bytes than the one-task merge"
        print(f"{k} process(es): {runs[k]['wall_s']:.2f} s (shards {runs[k]['shards_s']:.2f} s, final step "
              f"{runs[k]['final_s']:.2f} s)", flush=True)
    first = runs[args.processes[0]]
    read_bytes = sum(r["bytes_to_read"] for r in first["shard_reports"])
    write_s = max(r["write_s"] for r in first["shard_reports"])
    fixed_s = first["shards_s"] - write_s
    read_rate, final_rate = read_bytes / write_s, 2 * first["output_bytes"] / first["final_s"]  # two reads
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "models": args.models, "threads_per_process": args.threads, "bytes_to_read": read_bytes,
        "output_bytes": first["output_bytes"], "one_task_s": baseline[0],
        "runs": {k: {n: v for n, v in r.items() if n != "sha256"} for k, r in runs.items()},
        "ratio_vs_1_process": {k: first["wall_s"] / r["wall_s"] for k, r in runs.items()},
        "one_task_over_1_process": baseline[0] / first["wall_s"],
        "model": {"read_rate_gb_s": read_rate / GB, "final_rate_gb_s": final_rate / GB, "fixed_s": fixed_s,
                  "predicted_speedup_here": {k: predicted_speedup(k, read_bytes, first["output_bytes"], read_rate,
                                                                  final_rate, fixed_s) for k in (1, 2, 3, 8, 32)},
                  "predicted_speedup_200_sdxl": {k: predicted_speedup(k, 1.4e12, 6.94e9, 2 * GB, 1.4 * GB, 5)
                                                 for k in (1, 2, 4, 8, 16, 32, 64)}},
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
