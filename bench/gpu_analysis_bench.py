"""Benchmark: `analyze` with the Gram matrices on a GPU against one plain read of the same files.

    python bench/gpu_analysis_bench.py --n 8 --json gpu-analysis.json

N distinct full-size synthetic SD2.1 fp16 checkpoints (2.6 GB each, random values, real keys)
are written to --cache-dir (with the GPU's random generator: seconds), then, in one process:

* `read`: every byte of every file read once into a 16 MiB buffer, as bench/analysis_bench.py's
  `read` does (the floor for any analysis), twice;
* `analyze` on the GPU (all components, both metrics, no hashing), twice (the first one also
  starts CUDA);
* `analyze` on the CPU with --cpu-threads threads, once, for comparison.

Reports seconds and the ratios analysis / read (target, issue 5: within 1.5x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from merge_engine.analysis import analyze  # noqa: E402
from merge_engine.synthetic import write_full_size  # noqa: E402


def plain_read(paths: list[Path]) -> float:
    buffer, started = bytearray(16 << 20), time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cpu-threads", type=int, default=8, help="0: skip the CPU run")
    p.add_argument("--tiny", action="store_true", help="tiny models (checks the plumbing)")
    p.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "gpu-analysis")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = []
    for seed in range(args.n):
        path = args.cache_dir / f"sd2-{'tiny' if args.tiny else 'full'}-{seed}.safetensors"
        if not path.exists():
            if args.tiny:
                from merge_engine.synthetic import tiny_state_dict, write_checkpoint

                write_checkpoint(path, tiny_state_dict("sd2", seed=seed))
            else:
                write_full_size(path, "sd2", seed=seed, device="cuda" if torch.cuda.is_available() else "cpu")
        paths.append(path)
    print(f"{args.n} models ready in {time.perf_counter() - started:.1f} s", flush=True)
    reads = [plain_read(paths), plain_read(paths)]
    print(f"plain read: {reads[0]:.2f} s, {reads[1]:.2f} s", flush=True)
    device_runs = []
    for _ in range(2):
        result = analyze(paths, device=args.device)
        device_runs.append(result.seconds)
        print(f"analyze on {args.device}: {result.seconds:.2f} s", flush=True)
    results = {"n": args.n, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "bytes": sum(p.stat().st_size for p in paths), "read_s": reads,
               "device_s": device_runs, "device_over_read": min(device_runs) / statistics.median(reads)}
    if args.cpu_threads:
        cpu = analyze(paths, device="cpu", threads=args.cpu_threads)
        results["cpu_s"], results["cpu_threads"] = cpu.seconds, args.cpu_threads
        results["cpu_over_read"] = cpu.seconds / statistics.median(reads)
        print(f"analyze on the CPU ({args.cpu_threads} threads): {cpu.seconds:.2f} s", flush=True)
        for component, figures in result.components.items():  # the two devices agree
            theirs = cpu.components[component].figures.l2
            scale = max(abs(theirs).max(), 1e-300)
            results[f"max_l2_difference_{component}"] = float(abs(figures.figures.l2 - theirs).max() / scale)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
