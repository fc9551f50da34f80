"""Benchmark: sdmerge's non-linear methods (TIES, DARE, geometric median) against sd-mecha's on
the same full-size synthetic SD2.1 fp16 checkpoints, N = 4 and 8, warm page cache, in one run.

    /tmp/mecha-venv/bin/pip install torch==2.13.0 sd-mecha==1.1.8     # in a venv of its own, once
    .venv/bin/python bench/methods_bench.py --n 4 8 --json /tmp/methods-bench/results.json
    .venv/bin/python bench/methods_bench.py --small --n 4 8           # tiny models: the plumbing

For every N and method: `sdmerge merge` of the method's recipe, sd-mecha's same method
(bench/competitors.py `mecha_method`), and, as the reading limit, a plain sdmerge `uniform` merge of
the same inputs (the N models, and the base plus the N models for TIES and DARE, which read one
file more). Each merge is a process of its own under a stdlib-only wrapper (`_measure`) that takes
wall time, CPU time and peak RSS (`ru_maxrss`, plus anonymous and file-backed peaks sampled from
/proc) for that child alone, and the time from its start until its output file was opened
("output opened": everything before it is start-up, imports and planning). Both outputs are
durable when the clock stops: sdmerge fsyncs before its rename, the sd-mecha wrapper fsyncs after
`sd_mecha.merge` returns. The start-up of the CLI itself is measured on its own: `sdmerge merge`
of two tiny models against `python -c pass` and `python -c "import torch"` (same interpreter).

Methods and parameters (docs/METHODS.md for sdmerge, sd-mecha 1.1.8's built-ins):

    ties    sdmerge {"method": "ties", "base", "models", "k": 0.2, "vote_sgn": true, "alpha": 1}
            sd-mecha add_difference(base, ties_sum(*(subtract(m, base)), k=0.2, vote_sgn=True), alpha=1)
    dare    sdmerge {"method": "dare", "base", "models", "probability": 0.9, "rescale": true, "seed": 1,
            "alpha": 1/N}; sd-mecha (variant "each", --mecha-dare): add_difference(base, n_average(
            *(dropout(subtract(m_i, base), probability=0.9, rescale=1, seed=1+i))), alpha=1), which
            is the same formula b + sum(m_i d_i) / (N (1 - p)) with other random draws. Variants
            "dropout" (sd-mecha's N-way n-supermario `dropout`) and "ties" (ties_sum_with_dropout,
            k=1, no model stock: DARE plus sign election) are there to compare.
    median  sdmerge {"method": "geometric_median", "models", "eps": 1e-6, "maxiter": 100, "ftol": 1e-20}
            sd-mecha geometric_median(*models, eps=1e-6, maxiter=100, ftol=1e-20)

Inputs follow merge_bench.py: a base and as many distinct models as half the RAM holds are
generated once (merge_engine.synthetic.write_full_size, under --work, reused when their header
matches the layout); further inputs are hard links to them, so every input is still opened and
read in full while the page cache can hold them all. Targets (printed PASS/FAIL, at the largest N):
sdmerge >= 5x faster than sd-mecha, sdmerge's peak RSS <= 1/4 of sd-mecha's, and sdmerge's peak RSS
growing by <= 10% from the smallest N to the largest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
SDMERGE = REPO / ".venv" / "bin" / "sdmerge"
MERGE_BENCH = BENCH / "merge_bench.py"  # its _generate and _mecha_config helpers are reused
METHODS = ("ties", "dare", "median")
COMPETITORS = ("sdmerge", "mecha")
TARGETS = {"mecha_over_sdmerge": 5.0, "rss_fraction": 0.25, "rss_growth": 0.10}
FULL_BYTES, TINY_BYTES = 2_607_360_192, 40 << 20
BASE_SEED = 1000
GiB, MiB = 1 << 30, 1 << 20


# ---- the wrapper: one fresh small process per measured run -------------------------------

def measured(cmd: list[str], log: Path, output: Path, env: dict[str, str] | None = None) -> dict:
    """merge_bench.py's stdlib-only `_measure` wrapper, told which output to watch for."""
    proc = subprocess.run([sys.executable, str(MERGE_BENCH), "_measure", str(log), str(output), "--", *cmd],
                          capture_output=True, text=True, env=env, check=True)
    result = json.loads(proc.stdout)
    if result["rc"] != 0:
        result["error"] = log.read_text(errors="replace")[-1500:]
    return result


def _mecha(argv: list[str]) -> int:
    """`_mecha CONFIG METHOD OUT BASE|- PARAMS_JSON DEVICE IN...`, run with sd-mecha's python."""
    sys.path.insert(0, str(BENCH))
    from competitors import mecha_method

    config, method, output, base, params, device, *inputs = argv
    mecha_method(config, method, output, None if base == "-" else base, inputs, json.loads(params), device)
    return 0


# ---- inputs ---------------------------------------------------------------------------------

def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal"))


def generate(size: str, seed: int, path: Path) -> None:
    started = time.perf_counter()
    note = subprocess.run([str(VENV_PYTHON), str(MERGE_BENCH), "_generate", size, str(seed), str(path)],
                          capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    print(f"  {path.name}: {note} ({time.perf_counter() - started:.1f} s)", flush=True)


def prepare_inputs(args: argparse.Namespace) -> tuple[Path, list[Path], int]:
    """The base and `max(n)` model paths: `distinct` generated files, the rest hard links."""
    size = "tiny" if args.small else "full"
    n_max = max(args.n)
    per_file = FULL_BYTES if size == "full" else TINY_BYTES
    distinct = args.distinct or max(2, _mem_total() // 2 // per_file)
    distinct = min(distinct, n_max)
    base = args.work / f"sd2-{size}-base.safetensors"
    generate(size, BASE_SEED, base)
    seeds = []
    for seed in range(distinct):
        path = args.work / f"sd2-{size}-seed{seed}.safetensors"
        generate(size, seed, path)
        seeds.append(path)
    models = list(seeds)
    for i in range(distinct, n_max):
        link = args.work / f"sd2-{size}-seed{i % distinct}.link{i}.safetensors"
        if not (link.exists() and link.stat().st_ino == seeds[i % distinct].stat().st_ino):
            link.unlink(missing_ok=True)
            os.link(seeds[i % distinct], link)
        models.append(link)
    return base, models, distinct


def warm(paths: list[Path]) -> float:
    """Read every file once so the page cache holds it (merge_bench.py's); returns GB/s."""
    sys.path.insert(0, str(BENCH))
    from merge_bench import warm as merge_warm

    return merge_warm(paths)


# ---- recipes and commands -------------------------------------------------------------------

def params_for(method: str, n: int, args: argparse.Namespace) -> dict:
    if method == "ties":
        return {"k": 0.2, "vote_sgn": True, "alpha": 1.0}
    if method == "dare":
        return {"probability": 0.9, "rescale": True, "seed": 1, "alpha": 1.0 / n}
    if method == "median":
        return {"eps": 1e-6, "maxiter": 100, "ftol": 1e-20}
    return {}


def inputs_for(method: str, base: Path, models: list[Path]) -> tuple[Path | None, list[Path]]:
    return (base, models) if method in ("ties", "dare") else (None, models)


def sdmerge_recipe(method: str, base: Path | None, models: list[Path], params: dict) -> dict:
    node = {"method": "geometric_median" if method == "median" else method}
    if base is not None:
        node["base"] = str(base)
    node["models"] = [str(m) for m in models]
    node.update(params)
    return {"name": f"bench-{method}-{len(models)}", "merge": node, "output": {"dtype": "fp16"}}


def sdmerge_command(recipe: dict, label: str, output: Path, args: argparse.Namespace) -> list[str]:
    path = args.work / f"{label}.json"
    path.write_text(json.dumps(recipe, indent=1))
    extra = ["--threads", str(args.threads)] if args.threads else []
    return [str(SDMERGE), "merge", str(path), "-o", str(output), "--quiet", "--device", args.device, *extra]


def mecha_command(method: str, base: Path | None, models: list[Path], params: dict, output: Path,
                  args: argparse.Namespace) -> list[str]:
    if method == "dare":
        params = dict(params, variant=args.mecha_dare)
    return [args.mecha_python, str(Path(__file__)), "_mecha", str(args.work / "mecha-sd2.json"), method,
            str(output), str(base) if base else "-", json.dumps(params), args.device, *map(str, models)]


def run_one(cmd: list[str], label: str, output: Path, inputs: list[Path], args: argparse.Namespace,
            env: dict[str, str]) -> tuple[dict, Path]:
    output.unlink(missing_ok=True)
    warm(inputs)
    load = os.getloadavg()[0]
    result = measured(cmd, args.work / f"{label}.log", output, env)
    result["load_before"] = load
    if result["rc"] == 0:
        started = time.perf_counter()  # ~0 for both: each fsyncs its own output before exiting
        fd = os.open(output, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        result.update(fsync_after_s=time.perf_counter() - started, output_bytes=output.stat().st_size)
    return result, output


def compare(a: Path, b: Path) -> dict:
    proc = subprocess.run([str(VENV_PYTHON), str(BENCH / "competitors.py"), "compare", str(a), str(b)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def _print_run(run: dict) -> None:
    head = f"  N={run['n']} {run['method']:<8} {run['competitor']:<17}"
    if run["rc"] != 0:
        last = run.get("error", "").strip().splitlines()[-1:] or ["?"]
        print(f"{head} FAILED (status {run['rc']}, {run['wall_s']:.2f} s): {last[0][:200]}", flush=True)
        return
    opened = run.get("output_opened_s")
    print(f"{head} {run['wall_s']:8.2f} s wall {run['cpu_s']:8.2f} s cpu  peak RSS {run['maxrss_mib']:7.0f} MiB "
          f"(anon {run['peak_anon_mib']:.0f}, file {run['peak_file_mib']:.0f})  output opened at "
          f"{opened if opened is None else f'{opened:.2f} s'}  load {run['load_before']:.1f}", flush=True)


# ---- start-up ---------------------------------------------------------------------------------

def startup(args: argparse.Namespace, env: dict[str, str]) -> list[dict]:
    """`sdmerge merge` of two tiny models against the bare interpreter and `import torch`."""
    tiny = [args.work / "sd2-tiny-seed0.safetensors", args.work / "sd2-tiny-seed1.safetensors"]
    for seed, path in enumerate(tiny):
        generate("tiny", seed, path)
    recipe = {"name": "bench-startup", "merge": {"method": "uniform", "models": [str(p) for p in tiny]},
              "output": {"dtype": "fp16"}}
    out = args.work / "out-startup.safetensors"
    cases = {
        "python -c pass": [str(VENV_PYTHON), "-c", "pass"],
        "python -c 'import torch'": [str(VENV_PYTHON), "-c", "import torch"],
        "sdmerge --version": [str(SDMERGE), "--version"],
        "sdmerge merge (2 tiny models)": sdmerge_command(recipe, "startup", out, args),
    }
    out.unlink(missing_ok=True)
    subprocess.run(cases["sdmerge merge (2 tiny models)"], env=env, capture_output=True)  # hash cache warm
    rows = []
    for name, cmd in cases.items():
        runs = []
        for _ in range(args.startup_repeat):
            out.unlink(missing_ok=True)
            runs.append(measured(cmd, args.work / "startup.log", out, env))
        walls = [r["wall_s"] for r in runs if r["rc"] == 0]
        opened = [r["output_opened_s"] for r in runs if r.get("output_opened_s") is not None]
        row = {"case": name, "runs": len(runs), "failed": sum(r["rc"] != 0 for r in runs),
               "wall_median_s": statistics.median(walls) if walls else None,
               "wall_min_s": min(walls) if walls else None,
               "output_opened_median_s": statistics.median(opened) if opened else None,
               "maxrss_mib": max((r["maxrss_mib"] for r in runs), default=None)}
        rows.append(row)
        print(f"  {name:<32} median {row['wall_median_s'] or float('nan'):6.3f} s (min {row['wall_min_s'] or float('nan'):.3f})"
              + (f", output opened at {row['output_opened_median_s']:.3f} s" if opened else "")
              + (f", {row['failed']} FAILED" if row["failed"] else "")
              + f", peak RSS {row['maxrss_mib'] or 0:.0f} MiB", flush=True)
    out.unlink(missing_ok=True)
    return rows


# ---- one N ----------------------------------------------------------------------------------

def bench_n(n: int, base: Path, all_models: list[Path], args: argparse.Namespace,
            env: dict[str, str]) -> tuple[list[dict], list[dict]]:
    models = all_models[:n]
    runs, checks = [], []

    def record(method: str, competitor: str, cmd: list[str], inputs: list[Path], repeat: int) -> Path | None:
        label = f"{competitor}-{method}-{n}"
        result, output = run_one(cmd, label, args.work / f"out-{label}.safetensors", inputs, args, env)
        runs.append({"n": n, "method": method, "competitor": competitor, "repeat": repeat, **result})
        _print_run(runs[-1])
        return output if result["rc"] == 0 else None

    if args.baseline:  # the reading limit: uniform merges of the same files
        for label, inputs in (("uniform", models), ("uniform+base", [base, *models])):
            recipe = sdmerge_recipe("uniform", None, inputs, {})
            for repeat in range(args.repeat):
                out = record(label, "sdmerge", sdmerge_command(recipe, f"sdmerge-{label}-{n}",
                                                               args.work / f"out-sdmerge-{label}-{n}.safetensors", args),
                             inputs, repeat)
                if out:
                    out.unlink()
    for method in args.methods:
        b, ms = inputs_for(method, base, models)
        inputs = [b, *ms] if b else ms
        params = params_for(method, n, args)
        for repeat in range(args.repeat):
            kept: dict[str, Path] = {}
            for competitor in args.only:
                output = args.work / f"out-{competitor}-{method}-{n}.safetensors"
                cmd = (sdmerge_command(sdmerge_recipe(method, b, ms, params), f"sdmerge-{method}-{n}", output, args)
                       if competitor == "sdmerge" else mecha_command(method, b, ms, params, output, args))
                out = record(method, competitor, cmd, inputs, repeat)
                if out is not None:
                    kept[competitor] = out
            if repeat == 0 and not args.no_check and len(kept) == 2:
                report = compare(kept["sdmerge"], kept["mecha"])
                report.update(n=n, method=method)
                checks.append(report)
                problems = report["only_in_a"] or report["only_in_b"] or report["mismatched"]
                print(f"  check N={n} {method}: sdmerge vs sd-mecha, {report['keys']} keys, max |diff| "
                      f"{report['max_abs_diff']:.3g}, max {report['max_ulp_diff']} fp16 ulp, "
                      f"{report['elements_differing'] / max(report['elements'], 1):.2%} of elements differ"
                      + (" (other random draws: values are not expected to agree)" if method == "dare" else "")
                      + (f"  KEY/SHAPE MISMATCH {problems}" if problems else ""), flush=True)
            for out in kept.values():
                out.unlink(missing_ok=True)
    return runs, checks


# ---- summary --------------------------------------------------------------------------------

def summarise(runs: list[dict], ns: list[int], methods: list[str]) -> dict:
    rows: dict[str, dict] = {}
    for run in runs:
        if run["rc"] != 0:
            rows.setdefault(f"{run['competitor']}/{run['method']}@{run['n']}",
                            {"n": run["n"], "method": run["method"], "competitor": run["competitor"],
                             "walls": [], "failed": True, "error": run.get("error", "")[-300:]})
            continue
        row = rows.setdefault(f"{run['competitor']}/{run['method']}@{run['n']}",
                              {"n": run["n"], "method": run["method"], "competitor": run["competitor"], "walls": []})
        row.pop("failed", None)
        row["walls"].append(run["wall_s"])
        row["rss_mib"] = max(row.get("rss_mib", 0), run["maxrss_mib"])
        row["anon_mib"] = max(row.get("anon_mib", 0), run["peak_anon_mib"])
        row["cpu_s"] = min(row.get("cpu_s", float("inf")), run["cpu_s"])
        if run.get("output_opened_s") is not None:
            row["output_opened_s"] = min(row.get("output_opened_s", float("inf")), run["output_opened_s"])
    for row in rows.values():
        if row["walls"]:
            row["wall_median_s"], row["wall_min_s"] = statistics.median(row["walls"]), min(row["walls"])
    ok = {k: r for k, r in rows.items() if r["walls"]}
    ratios: dict[str, float] = {}
    for n in ns:
        for method in methods:
            sd, me = ok.get(f"sdmerge/{method}@{n}"), ok.get(f"mecha/{method}@{n}")
            if sd and me:
                ratios[f"{method}_mecha_over_sdmerge_wall_n{n}"] = me["wall_median_s"] / sd["wall_median_s"]
                ratios[f"{method}_mecha_over_sdmerge_cpu_n{n}"] = me["cpu_s"] / sd["cpu_s"]
                ratios[f"{method}_sdmerge_over_mecha_rss_n{n}"] = sd["rss_mib"] / me["rss_mib"]
            baseline = ok.get(f"sdmerge/{'uniform+base' if method in ('ties', 'dare') else 'uniform'}@{n}")
            if sd and baseline:
                ratios[f"{method}_sdmerge_over_uniform_wall_n{n}"] = sd["wall_median_s"] / baseline["wall_median_s"]
            if me and baseline:
                ratios[f"{method}_mecha_over_sdmerge_uniform_wall_n{n}"] = me["wall_median_s"] / baseline["wall_median_s"]
    if len(ns) >= 2:
        lo, hi = min(ns), max(ns)
        for method in [*methods, "uniform", "uniform+base"]:
            for competitor in COMPETITORS:
                a, b = ok.get(f"{competitor}/{method}@{lo}"), ok.get(f"{competitor}/{method}@{hi}")
                if a and b:
                    ratios[f"{method}_{competitor}_rss_growth_n{lo}_to_n{hi}"] = b["rss_mib"] / a["rss_mib"] - 1
    return {"rows": list(rows.values()), "ratios": ratios, "targets": _targets(ratios, ns, methods)}


def _targets(ratios: dict, ns: list[int], methods: list[str]) -> dict:
    hi, lo, out = max(ns), min(ns), {}
    for method in methods:
        if (r := ratios.get(f"{method}_mecha_over_sdmerge_wall_n{hi}")) is not None:
            out[f"{method}: sdmerge >= {TARGETS['mecha_over_sdmerge']:g}x faster than sd-mecha at N={hi} ({r:.1f}x)"] = \
                r >= TARGETS["mecha_over_sdmerge"]
        if (r := ratios.get(f"{method}_sdmerge_over_mecha_rss_n{hi}")) is not None:
            out[f"{method}: sdmerge peak RSS <= 1/4 of sd-mecha's at N={hi} ({r:.3f})"] = r <= TARGETS["rss_fraction"]
        if (g := ratios.get(f"{method}_sdmerge_rss_growth_n{lo}_to_n{hi}")) is not None:
            out[f"{method}: sdmerge peak RSS growth N={lo}->{hi} <= 10% ({g:+.1%})"] = g <= TARGETS["rss_growth"]
    return out


def print_table(summary: dict, startup_rows: list[dict]) -> None:
    print(f"\n{'N':>2}  {'method':<13} {'competitor':<10} {'wall median':>11} {'wall min':>9} {'cpu':>8} "
          f"{'peak RSS':>10} {'anon peak':>10} {'opened at':>9}  runs")
    for r in summary["rows"]:
        if not r["walls"]:
            print(f"{r['n']:>2}  {r['method']:<13} {r['competitor']:<10} FAILED")
            continue
        opened = r.get("output_opened_s")
        print(f"{r['n']:>2}  {r['method']:<13} {r['competitor']:<10} {r['wall_median_s']:>9.2f} s {r['wall_min_s']:>7.2f} s "
              f"{r['cpu_s']:>6.1f} s {r['rss_mib']:>6.0f} MiB {r['anon_mib']:>6.0f} MiB "
              f"{'' if opened is None else f'{opened:7.2f} s':>9}  {len(r['walls'])}")
    if startup_rows:
        print("\nstart-up:")
        for r in startup_rows:
            print(f"  {r['case']:<32} {r['wall_median_s'] or float('nan'):6.3f} s"
                  + (f"  (output opened at {r['output_opened_median_s']:.3f} s)" if r["output_opened_median_s"] else ""))
    print()
    for name, value in summary["ratios"].items():
        print(f"  {name:<52} {value:8.3f}" + ("" if "growth" in name or "rss_n" in name else "x"))
    for name, passed in summary["targets"].items():
        print(f"  [{'PASS' if passed else 'FAIL'}] {name}")


# ---- machine and main -----------------------------------------------------------------------

def machine_info(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(BENCH))
    from merge_bench import machine_info as merge_machine_info  # stdlib only at import

    return merge_machine_info(args)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4, 8], help="model counts (default: 4 8)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--only", nargs="+", choices=COMPETITORS, default=list(COMPETITORS),
                   help="competitors (the sdmerge uniform baselines run unless --no-baseline)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="merge device for both")
    p.add_argument("--work", type=Path, default=Path("/tmp/methods-bench"),
                   help="generated models (reused), recipes, logs and outputs (default: /tmp/methods-bench)")
    p.add_argument("--json", type=Path, help="write machine info, runs, checks, ratios and targets here")
    p.add_argument("--small", action="store_true", help="tiny SD2-shaped checkpoints (real keys), for a quick check")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per merge (median reported)")
    p.add_argument("--distinct", type=int, default=0,
                   help="distinct model files (plus the base); more inputs are hard links (default: as many as half the RAM holds)")
    p.add_argument("--threads", type=int, default=0, help="sdmerge --threads (default: the engine's choice)")
    p.add_argument("--mecha-python", default="/tmp/mecha-venv/bin/python", help="python with sd-mecha installed")
    p.add_argument("--mecha-dare", default="each", choices=("each", "dropout", "ties"),
                   help="which sd-mecha composition stands for DARE (default: each, the same formula)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the sdmerge uniform merges")
    p.add_argument("--no-startup", dest="startup", action="store_false", help="skip the start-up measurement")
    p.add_argument("--startup-repeat", type=int, default=5)
    p.add_argument("--no-check", action="store_true", help="skip comparing sdmerge's output with sd-mecha's")
    args = p.parse_args(argv)
    args.only = [c for c in COMPETITORS if c in args.only]
    args.methods = [m for m in METHODS if m in args.methods]
    args.n = sorted(set(args.n))
    args.work = args.work.resolve()
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    info = machine_info(args)
    print(f"machine: {info}", flush=True)
    print(f"disk free under {args.work}: {shutil.disk_usage(args.work).free / 1e9:.1f} GB", flush=True)
    env = dict(os.environ, SDMERGE_HASH_CACHE=str(args.work / "hashes.sqlite3"), TQDM_DISABLE="1")
    startup_rows = []
    if args.startup:
        print("start-up:", flush=True)
        startup_rows = startup(args, env)
    print("inputs:", flush=True)
    base, models, distinct = prepare_inputs(args)
    if "mecha" in args.only:
        subprocess.run([str(VENV_PYTHON), str(MERGE_BENCH), "_mecha_config", "tiny" if args.small else "full",
                        str(args.work / "mecha-sd2.json")], check=True, cwd=REPO)
    files = [base, *models]
    print(f"warming the page cache: {warm(files):.2f} GB/s, then {warm(files):.2f} GB/s "
          f"(base + {distinct} distinct files, {len(models) - distinct} hard links)", flush=True)
    runs, checks = [], []
    if "sdmerge" in args.only or args.baseline:  # empty hash cache: the first merge hashes every input once
        Path(env["SDMERGE_HASH_CACHE"]).unlink(missing_ok=True)
        recipe = sdmerge_recipe("uniform", None, files, {})
        output = args.work / "out-sdmerge-cold-hash.safetensors"
        result, output = run_one(sdmerge_command(recipe, "sdmerge-cold-hash", output, args),
                                 "sdmerge-cold-hash", output, files, args, env)
        runs.append({"n": len(models), "method": "uniform+base (cold hash)", "competitor": "sdmerge", "repeat": 0, **result})
        _print_run(runs[-1])
        output.unlink(missing_ok=True)
    for n in args.n:
        print(f"N={n}:", flush=True)
        r, c = bench_n(n, base, models, args, env)
        runs += r
        checks += c
    summary = summarise([r for r in runs if "cold" not in r["method"]], args.n, args.methods)
    print_table(summary, startup_rows)
    if args.json:
        command = " ".join([os.path.relpath(sys.executable, REPO), "bench/methods_bench.py", *argv])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "machine": info, "distinct_files": distinct,
                                         "input_bytes": models[0].stat().st_size, "startup": startup_rows,
                                         "runs": runs, "checks": checks, **summary}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    helpers = {"_mecha": _mecha}
    if len(sys.argv) > 1 and sys.argv[1] in helpers:
        sys.exit(helpers[sys.argv[1]](sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
