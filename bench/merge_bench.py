"""Benchmark: `sdmerge merge` against a plain streaming merge and sd-mecha, N-way uniform merges
of full-size synthetic SD2.1 fp16 checkpoints, warm page cache. See bench/README.md.

    .venv/bin/python bench/merge_bench.py --n 4 8 --json bench-results.json

Every merge runs in a process of its own under a small stdlib-only wrapper (`_measure`), which
takes wall time, CPU time and peak RSS from wait4() on that one child: the numbers belong to
the competitor alone, never to this script (which itself never imports torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
SDMERGE = REPO / ".venv" / "bin" / "sdmerge"
COMPETITORS = ("sdmerge", "sdmerge-torch", "reference", "mecha")
DEFAULT_COMPETITORS = ("sdmerge", "reference", "mecha")  # sdmerge-torch: the CLI without its native kernel
MECHA_CONFIG_ID = "sd2-ldm"
MECHA_COMPONENTS = {"unet": "unet", "text_encoder": "clip_h", "vae": "vae"}
TARGETS = {"reference_over_sdmerge": 2.5, "mecha_over_sdmerge": 10.0, "rss_mib": 1024.0, "rss_growth": 0.10}
GiB, MiB = 1 << 30, 1 << 20


# ---- the wrapper: one fresh small process per measured run -------------------------------

def _measure(argv: list[str]) -> int:
    """`_measure LOG [OUTPUT] -- CMD...`: run CMD; print wall/cpu/maxrss JSON for that child alone,
    and, given OUTPUT, when a file named like it (OUTPUT itself or sdmerge's `.NAME.*.partial`) appeared."""
    log, cmd = argv[0], argv[argv.index("--") + 1:]
    output = Path(argv[1]) if argv[1] != "--" else None
    peaks = {"RssAnon": 0, "RssFile": 0}
    opened: list[float] = []
    done = threading.Event()
    with open(log, "wb") as out:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

        def sample() -> None:  # anon vs file-backed split: mmap'd inputs count in ru_maxrss
            tick = 0
            while not done.wait(0.005):
                if output is not None and not opened:
                    try:
                        if any(name == output.name or name.startswith(f".{output.name}.")
                               for name in os.listdir(output.parent)):
                            opened.append(time.perf_counter() - started)
                    except OSError:
                        pass
                tick += 1
                if tick % 4:
                    continue
                try:
                    with open(f"/proc/{child.pid}/status") as f:
                        for line in f:
                            name = line.split(":", 1)[0]
                            if name in peaks:
                                peaks[name] = max(peaks[name], int(line.split()[1]))
                except OSError:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        done.set()
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall,
                      "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_mib": usage.ru_maxrss / 1024,
                      "peak_anon_mib": peaks["RssAnon"] / 1024, "peak_file_mib": peaks["RssFile"] / 1024,
                      "output_opened_s": opened[0] if opened else None}))
    return 0


def measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__)), "_measure", str(log), "--", *cmd],
                          capture_output=True, text=True, env=env, check=True)
    result = json.loads(proc.stdout)
    if result["rc"] != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{cmd[0]} failed with status {result['rc']}:\n{tail}")
    return result


# ---- checkpoints: generated once by the engine's synthetic module, cached -----------------

def _generate(argv: list[str]) -> int:
    """`_generate SIZE SEED PATH` (in the project venv): write or reuse one checkpoint."""
    size, seed, path = argv[0], int(argv[1]), Path(argv[2])
    from merge_engine.checkpoint import open_checkpoint
    from merge_engine.synthetic import tiny_specs, write_full_size, write_random

    specs = _specs(size)
    if path.exists():
        with open_checkpoint(path) as ckpt:
            if {k: (t.dtype, t.shape) for k, t in ckpt.tensors.items()} == {k: (s.dtype, s.shape) for k, s in specs.items()}:
                print("reused")
                return 0
    started = time.perf_counter()
    if size == "full":
        write_full_size(path, "sd2", seed=seed)
    else:
        write_random(path, tiny_specs("sd2"), seed=seed, metadata={"sdmerge.synthetic": f"sd2 tiny seed {seed}"})
    print(f"generated in {time.perf_counter() - started:.1f} s")
    return 0


def _specs(size: str):
    from merge_engine.synthetic import full_size_specs, tiny_specs

    return full_size_specs("sd2") if size == "full" else tiny_specs("sd2")


def _mecha_config(argv: list[str]) -> int:
    """`_mecha_config SIZE PATH`: an sd-mecha model config with the layout's keys and shapes."""
    from merge_engine.architecture import layout

    specs, prefixes = _specs(argv[0]), layout("sd2").prefixes
    dtypes = {"F16": "float16", "F32": "float32", "I64": "int64", "I32": "int32"}
    components: dict[str, dict] = {MECHA_COMPONENTS[c]: {} for c in prefixes}
    for key, spec in specs.items():
        component = next(c for c, prefix in prefixes.items() if key.startswith(prefix))
        components[MECHA_COMPONENTS[component]][key] = [list(spec.shape), dtypes[spec.dtype]]
    Path(argv[1]).write_text(json.dumps({"identifier": MECHA_CONFIG_ID, "components": components}))
    return 0


def prepare_inputs(args: argparse.Namespace, cache: Path) -> tuple[list[Path], int]:
    """`max(n)` input paths: `distinct` generated files, the rest hard links to them."""
    size = "tiny" if args.small else "full"
    n_max = max(args.n)
    distinct = args.distinct or min(n_max, max(2, _mem_total() // 2 // (2_607_360_192 if size == "full" else 40 * MiB)))
    distinct = min(distinct, n_max)
    seeds = []
    for seed in range(distinct):
        path = cache / f"sd2-{size}-seed{seed}.safetensors"
        started = time.perf_counter()
        note = subprocess.run([str(VENV_PYTHON), str(Path(__file__)), "_generate", size, str(seed), str(path)],
                              capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
        print(f"  {path.name}: {note} ({time.perf_counter() - started:.1f} s)", flush=True)
        seeds.append(path)
    inputs = list(seeds)
    for i in range(distinct, n_max):
        link = cache / f"sd2-{size}-seed{i % distinct}.link{i}.safetensors"
        if not (link.exists() and link.stat().st_ino == seeds[i % distinct].stat().st_ino):
            link.unlink(missing_ok=True)
            os.link(seeds[i % distinct], link)
        inputs.append(link)
    return inputs, distinct


def warm(paths: list[Path]) -> float:
    """Read every file once so the page cache holds it; returns GB/s (several GB/s when cached)."""
    buffer, total, started = bytearray(16 * MiB), 0, time.perf_counter()
    for path in dict.fromkeys(p.resolve() for p in paths):
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(buffer):
                total += got
    return total / 1e9 / max(time.perf_counter() - started, 1e-9)


# ---- one merge of each competitor ---------------------------------------------------------

def command_for(competitor: str, inputs: list[Path], output: Path, work: Path, args: argparse.Namespace) -> list[str]:
    if competitor in ("sdmerge", "sdmerge-torch"):
        recipe = work / f"uniform-{len(inputs)}.json"
        recipe.write_text(json.dumps({"name": f"bench-uniform-{len(inputs)}",
                                      "merge": {"method": "uniform", "models": [str(p) for p in inputs]},
                                      "output": {"dtype": "fp16"}}, indent=1))
        extra = ["--threads", str(args.threads)] if args.threads else []
        return [str(SDMERGE), "merge", str(recipe), "-o", str(output), "--quiet", *extra]
    script = str(BENCH / "competitors.py")
    if competitor == "reference":
        return [str(VENV_PYTHON), script, "reference", str(output), *map(str, inputs)]
    return [args.mecha_python, script, "mecha", str(work / "mecha-sd2.json"), str(output), *map(str, inputs)]


def run_one(competitor: str, inputs: list[Path], work: Path, args: argparse.Namespace,
            env: dict[str, str], label: str) -> tuple[dict, Path]:
    output = work / f"out-{label}.safetensors"
    output.unlink(missing_ok=True)
    warm(inputs)
    load = os.getloadavg()[0]
    if competitor == "sdmerge-torch":
        env = dict(env, SDMERGE_NATIVE="0")
    result = measured(command_for(competitor, inputs, output, work, args), work / f"{label}.log", env)
    started = time.perf_counter()  # what making its output durable costs (sdmerge fsyncs itself)
    fd = os.open(output, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    result.update(load_before=load, fsync_after_s=time.perf_counter() - started, output_bytes=output.stat().st_size)
    return result, output


def compare(a: Path, b: Path) -> dict:
    proc = subprocess.run([str(VENV_PYTHON), str(BENCH / "competitors.py"), "compare", str(a), str(b)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def bench_n(n: int, inputs: list[Path], work: Path, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    runs, checks = [], []
    env = dict(os.environ, SDMERGE_HASH_CACHE=str(work / f"hashes-{n}.sqlite3"), TQDM_DISABLE="1")
    if "sdmerge" in args.only:  # hash cache empty: the first merge hashes every input once
        Path(env["SDMERGE_HASH_CACHE"]).unlink(missing_ok=True)
        result, output = run_one("sdmerge", inputs, work, args, env, f"sdmerge-cold-{n}")
        runs.append({"n": n, "competitor": "sdmerge-cold-hash", "repeat": 0, **result})
        output.unlink()
        _print_run(runs[-1])
    for repeat in range(args.repeat):
        kept: dict[str, Path] = {}
        for competitor in args.only:
            result, output = run_one(competitor, inputs, work, args, env, f"{competitor}-{n}")
            runs.append({"n": n, "competitor": competitor, "repeat": repeat, **result})
            _print_run(runs[-1])
            if repeat or args.no_check:
                output.unlink()
                continue
            base = next(iter(kept.values()), None)
            if base is not None:
                report = compare(base, output)
                checks.append({"n": n, "a": next(iter(kept)), "b": competitor, **report})
                _print_check(checks[-1])
                output.unlink()
            else:
                kept[competitor] = output
        for output in kept.values():
            output.unlink(missing_ok=True)
    return runs, checks


def _print_run(run: dict) -> None:
    print(f"  N={run['n']} {run['competitor']:<18} #{run['repeat']}  {run['wall_s']:7.2f} s wall  "
          f"{run['cpu_s']:7.2f} s cpu  peak RSS {run['maxrss_mib']:8.1f} MiB (anon {run['peak_anon_mib']:.0f}, "
          f"file {run['peak_file_mib']:.0f})  load {run['load_before']:.1f}", flush=True)


def _print_check(check: dict) -> None:
    problems = check["only_in_a"] or check["only_in_b"] or check["mismatched"]
    print(f"  check N={check['n']} {check['a']} vs {check['b']}: {check['keys']} keys, max |diff| "
          f"{check['max_abs_diff']:.3g}, max {check['max_ulp_diff']} fp16 ulp"
          f"{'  KEY/SHAPE MISMATCH ' + str(problems) if problems else ''}", flush=True)


# ---- summary --------------------------------------------------------------------------------

def summarise(runs: list[dict], checks: list[dict], ns: list[int]) -> dict:
    rows: dict[str, dict] = {}
    for run in runs:
        row = rows.setdefault(f"{run['competitor']}@{run['n']}", {"n": run["n"], "competitor": run["competitor"], "walls": []})
        row["walls"].append(run["wall_s"])
        row["rss_mib"] = max(row.get("rss_mib", 0), run["maxrss_mib"])
        row["anon_mib"] = max(row.get("anon_mib", 0), run["peak_anon_mib"])
        row["cpu_s"] = min(row.get("cpu_s", float("inf")), run["cpu_s"])
        row["fsync_after_s"] = max(row.get("fsync_after_s", 0), run["fsync_after_s"])
    for row in rows.values():
        row["wall_median_s"], row["wall_min_s"] = statistics.median(row["walls"]), min(row["walls"])
    ratios: dict[str, float] = {}
    for n in ns:
        base = rows.get(f"sdmerge@{n}")
        for other in ("sdmerge-torch", "reference", "mecha"):
            if base and (row := rows.get(f"{other}@{n}")):
                ratios[f"{other}_over_sdmerge_wall_n{n}"] = row["wall_median_s"] / base["wall_median_s"]
                # CPU seconds are steadier than wall time when the cores are shared
                ratios[f"{other}_over_sdmerge_cpu_n{n}"] = row["cpu_s"] / base["cpu_s"]
    if len(ns) >= 2:
        lo, hi = min(ns), max(ns)
        for competitor in COMPETITORS:
            a, b = rows.get(f"{competitor}@{lo}"), rows.get(f"{competitor}@{hi}")
            if a and b:
                ratios[f"{competitor}_rss_growth_n{lo}_to_n{hi}"] = b["rss_mib"] / a["rss_mib"] - 1
    return {"rows": list(rows.values()), "ratios": ratios, "checks": checks, "targets": _targets(rows, ratios, ns, checks)}


def _targets(rows: dict, ratios: dict, ns: list[int], checks: list[dict]) -> dict:
    n4 = 4 if 4 in ns else min(ns)
    out = {}
    if (r := ratios.get(f"reference_over_sdmerge_wall_n{n4}")) is not None:
        out[f"sdmerge >= {TARGETS['reference_over_sdmerge']}x faster than reference at N={n4}"] = r >= TARGETS["reference_over_sdmerge"]
    if (r := ratios.get(f"mecha_over_sdmerge_wall_n{n4}")) is not None:
        out[f"sdmerge >= {TARGETS['mecha_over_sdmerge']}x faster than sd-mecha at N={n4}"] = r >= TARGETS["mecha_over_sdmerge"]
    sd = [r for r in rows.values() if r["competitor"] == "sdmerge"]
    if sd:
        out["sdmerge peak RSS < 1 GiB"] = max(r["rss_mib"] for r in sd) < TARGETS["rss_mib"]
    growth = [v for k, v in ratios.items() if k.startswith("sdmerge_rss_growth")]
    if growth:
        out[f"sdmerge RSS growth N={min(ns)}->{max(ns)} < 10%"] = growth[0] < TARGETS["rss_growth"]
    for check in checks:
        if check["a"] == "sdmerge" and check["b"] == "reference":
            out[f"sdmerge == reference within 1 fp16 ulp at N={check['n']}"] = (
                check["max_ulp_diff"] <= 1 and not (check["only_in_a"] or check["only_in_b"] or check["mismatched"]))
    return out


def print_table(summary: dict) -> None:
    print(f"\n{'N':>2}  {'competitor':<18} {'wall median':>11} {'wall min':>9} {'cpu':>8} {'peak RSS':>10} "
          f"{'anon peak':>10} {'fsync after':>11}  runs")
    for r in summary["rows"]:
        print(f"{r['n']:>2}  {r['competitor']:<18} {r['wall_median_s']:>9.2f} s {r['wall_min_s']:>7.2f} s "
              f"{r['cpu_s']:>6.1f} s {r['rss_mib']:>6.0f} MiB {r['anon_mib']:>6.0f} MiB {r['fsync_after_s']:>9.2f} s  "
              f"{len(r['walls'])}")
    print()
    for name, value in summary["ratios"].items():
        print(f"  {name:<40} {value:8.3f}" + ("" if "growth" in name else "x"))
    for name, ok in summary["targets"].items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")


# ---- machine and main -----------------------------------------------------------------------

def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal"))


def machine_info(args: argparse.Namespace) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    probe = "import json,torch,safetensors; print(json.dumps({'torch': torch.__version__, 'torch_threads': torch.get_num_threads(), 'safetensors': safetensors.__version__}))"
    info = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "mem_total_gib": round(_mem_total() / GiB, 1), "kernel": platform.release(),
            "python": platform.python_version(),
            **json.loads(subprocess.run([str(VENV_PYTHON), "-c", probe], capture_output=True, text=True, check=True).stdout)}
    version = "import importlib.metadata as m; print(m.version('sdmerge'))"
    info["sdmerge"] = subprocess.run([str(VENV_PYTHON), "-c", version], capture_output=True, text=True).stdout.strip()
    if "mecha" in args.only:
        probe = "import importlib.metadata as m, torch; print(m.version('sd-mecha'), torch.__version__)"
        out = subprocess.run([args.mecha_python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
        info["sd_mecha"], info["sd_mecha_torch"] = out
    return info


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4, 8], help="model counts to merge (default: 4 8)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per competitor and N (median reported)")
    p.add_argument("--only", nargs="+", choices=COMPETITORS, default=list(DEFAULT_COMPETITORS),
                   help="competitors to run (default: sdmerge reference mecha)")
    p.add_argument("--mecha-python", default="/tmp/mecha-venv/bin/python", help="python with sd-mecha installed")
    p.add_argument("--small", action="store_true", help="tiny SD2-shaped checkpoints (real keys), for a quick check")
    p.add_argument("--distinct", type=int, default=0,
                   help="distinct files generated; more inputs are hard links to them (default: as many as half the RAM holds)")
    p.add_argument("--threads", type=int, default=0, help="sdmerge --threads (default: the engine's choice)")
    p.add_argument("--cache-dir", type=Path, default=BENCH / ".cache")
    p.add_argument("--no-check", action="store_true", help="skip comparing outputs")
    p.add_argument("--json", type=Path, help="write machine info, runs, checks and ratios here")
    args = p.parse_args(argv)
    args.only = [c for c in COMPETITORS if c in args.only]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cache = args.cache_dir.resolve()
    work = cache / ("work-small" if args.small else "work")
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info(args)
    print(f"machine: {info}", flush=True)
    free = shutil.disk_usage(cache).free
    print(f"disk free under {cache}: {free / 1e9:.1f} GB", flush=True)
    print("inputs:", flush=True)
    inputs, distinct = prepare_inputs(args, cache)
    if "mecha" in args.only:
        subprocess.run([str(VENV_PYTHON), str(Path(__file__)), "_mecha_config", "tiny" if args.small else "full",
                        str(work / "mecha-sd2.json")], check=True, cwd=REPO)
    print(f"warming the page cache: {warm(inputs):.2f} GB/s on first read, {warm(inputs):.2f} GB/s on the second "
          f"({distinct} distinct files, {len(inputs) - distinct} hard links)", flush=True)
    runs, checks = [], []
    for n in args.n:
        print(f"N={n}:", flush=True)
        r, c = bench_n(n, inputs[:n], work, args)
        runs += r
        checks += c
    summary = summarise(runs, checks, args.n)
    print_table(summary)
    if args.json:
        command = " ".join([os.path.relpath(sys.executable, REPO), "bench/merge_bench.py", *argv])
        args.json.write_text(json.dumps({"command": command, "machine": info, "distinct_files": distinct,
                                         "input_bytes": inputs[0].stat().st_size, "runs": runs, **summary}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    helpers = {"_measure": _measure, "_generate": _generate, "_mecha_config": _mecha_config}
    if len(sys.argv) > 1 and sys.argv[1] in helpers:
        sys.exit(helpers[sys.argv[1]](sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
