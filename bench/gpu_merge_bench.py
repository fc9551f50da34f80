"""Benchmark: the engine's GPU accumulator against its CPU path, in one process, same run.

    python bench/gpu_merge_bench.py --n 4 --json gpu-merge.json

N full-size synthetic SD2.1 fp16 checkpoints (random values, real keys) are written to
--cache-dir, read once to warm the page cache, then merged (uniform) alternately with
`device="cpu"` and `device="cuda"`, `--repeat` times each. Reports the median seconds of each,
their ratio, and whether the two outputs are byte-identical (their sha256, hashed while writing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from merge_engine.execute import ExecOptions, merge  # noqa: E402
from merge_engine.hashing import hash_file  # noqa: E402
from merge_engine.plan import plan  # noqa: E402
from merge_engine.recipe import parse_recipe  # noqa: E402
from merge_engine.resolve import FileResolver  # noqa: E402
from merge_engine.synthetic import write_full_size  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "gpu-merge")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare", file=sys.stderr)
        return 2
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    names = []
    started = time.perf_counter()
    for i in range(args.n):
        path = args.cache_dir / f"sd2-gpu-seed{i}.safetensors"
        if not path.exists():
            write_full_size(path, "sd2", seed=i, device="cuda")
        hash_file(path)  # also warms the page cache
        names.append(path.name)
    print(f"{args.n} models ready and hashed in {time.perf_counter() - started:.1f} s", flush=True)
    recipe = parse_recipe({"merge": {"method": "uniform", "models": names}})
    runs: dict[str, list[float]] = {"cpu": [], "cuda": []}
    digests: dict[str, set[str]] = {"cpu": set(), "cuda": set()}
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as out:
        for _ in range(args.repeat):
            for device in ("cpu", "cuda"):
                planned = plan(recipe, FileResolver(args.cache_dir))
                try:
                    result = merge(planned, Path(out) / f"{device}.safetensors", options=ExecOptions(device=device),
                                   overwrite=True, compute_sha256=True)
                finally:
                    planned.close()
                runs[device].append(result.seconds)
                digests[device].add(result.sha256 or "")
                print(f"{device}: {result.seconds:.2f} s", flush=True)
    cpu, cuda = statistics.median(runs["cpu"]), statistics.median(runs["cuda"])
    results = {"n": args.n, "gpu": torch.cuda.get_device_name(), "output_bytes": result.size,
               "cpu_s": cpu, "cuda_s": cuda, "cpu_over_cuda": cpu / cuda, "runs": runs,
               "identical_output": len(digests["cpu"] | digests["cuda"]) == 1}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
