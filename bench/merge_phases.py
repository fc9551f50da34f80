"""Where a CLI merge's time goes: each phase of `sdmerge merge` timed in one process.

    .venv/bin/python bench/merge_phases.py bench/.cache/work/uniform-4.json -o /tmp/out.safetensors --repeat 3
    SDMERGE_NATIVE=0 .venv/bin/python bench/merge_phases.py ...      # the torch path, for an A/B

Phases: `import torch`, the engine's imports (pydantic for the recipe), reading the recipe,
planning (headers, detection, hash cache), and the merge itself; `--repeat K` merges K times in
the same process (the output is deleted between runs), so the merge's own time can be compared
across builds without process start and imports in the way. Timings only: nothing is checked.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--hash", action="store_true", help="compute the output's sha256 while writing")
    args = parser.parse_args()
    last = [STARTED]

    def phase(name: str) -> None:
        now = time.perf_counter()
        print(f"{name:<16} {now - last[0]:7.3f} s", flush=True)
        last[0] = now

    import torch  # noqa: F401

    phase("import torch")
    from merge_engine import cli, kernels
    from merge_engine.execute import merge
    from merge_engine.plan import plan

    phase("engine imports")
    cli_args = cli.build_parser().parse_args(["merge", str(args.recipe), "-o", str(args.output), "--quiet"])
    recipe, resolver = cli.load_recipe(cli_args)
    phase("recipe")
    print(f"arithmetic: {kernels.describe()}")
    for _ in range(args.repeat):
        last[0] = time.perf_counter()
        merge_plan = plan(recipe, resolver)
        phase("plan")
        cpu = os.times()
        try:
            merge(merge_plan, args.output, overwrite=True, compute_sha256=args.hash)
        finally:
            merge_plan.close()
        used = os.times()
        phase("merge")
        print(f"{'':<16} cpu {used.user - cpu.user:.2f} s user, {used.system - cpu.system:.2f} s sys")
        args.output.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
