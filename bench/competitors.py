"""The merges sdmerge is measured against, and the check that they all computed the same thing.

Each runs as its own process, started by merge_bench.py, so that its wall time and peak RSS
are its alone:

    .venv/bin/python bench/competitors.py reference OUT.safetensors IN.safetensors...
    /tmp/mecha-venv/bin/python bench/competitors.py mecha CONFIG.json OUT.safetensors IN...
    .venv/bin/python bench/competitors.py compare A.safetensors B.safetensors

Imports live inside the functions: the sd-mecha environment has neither sdmerge nor its
dependencies, and nothing here may cost a competitor memory it would not spend on its own.
"""

from __future__ import annotations

import json
import sys


def reference_merge(output: str, inputs: list[str]) -> None:
    """The obvious streaming merge a competent person writes in twenty lines: one safe_open
    per file, each key read from every file and summed in fp32, one save_file at the end."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    handles = [safe_open(path, framework="pt") for path in inputs]
    merged = {}
    for key in handles[0].keys():
        first = handles[0].get_tensor(key)
        if not first.is_floating_point():
            merged[key] = first  # integer buffers are copied, never averaged
            continue
        acc = first.to(torch.float32)
        for handle in handles[1:]:
            acc += handle.get_tensor(key).to(torch.float32)
        merged[key] = (acc / len(handles)).to(torch.float16)
    save_file(merged, output)


def mecha_merge(config_path: str, output: str, inputs: list[str]) -> None:
    """sd-mecha's uniform average with an SD2 model config declared from the layout.

    sd-mecha ships no SD2 config and its detection takes SD2 files for SD1 (the UNet keys are
    shared), so the config is registered here from the keys and shapes merge_bench.py wrote.
    Everything else is sd-mecha's default: fp32 merge dtype, its own thread count, its buffers.
    """
    import sd_mecha
    import torch
    from sd_mecha.extensions import model_configs

    with open(config_path, encoding="utf-8") as f:
        spec = json.load(f)
    components = {
        name: model_configs.ModelComponent({key: {"shape": shape, "dtype": dtype}
                                            for key, (shape, dtype) in keys.items()})
        for name, keys in spec["components"].items()
    }
    model_configs.register(model_configs.ModelConfigImpl(spec["identifier"], components))
    models = [sd_mecha.model(path, config=spec["identifier"]) for path in inputs]
    sd_mecha.merge(sd_mecha.n_average(*models), output=output, output_dtype=torch.float16)


def compare(path_a: str, path_b: str) -> dict:
    """Key sets, dtypes, shapes, and the largest difference in absolute value and fp16 ulps."""
    import torch
    from safetensors import safe_open

    def ordered(t: torch.Tensor) -> torch.Tensor:
        # fp16 bit patterns mapped onto a line where neighbouring values differ by one
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    report = {"keys": 0, "only_in_a": [], "only_in_b": [], "mismatched": [], "elements": 0,
              "elements_differing": 0, "max_abs_diff": 0.0, "max_ulp_diff": 0, "worst_key": None}
    with safe_open(path_a, framework="pt") as a, safe_open(path_b, framework="pt") as b:
        keys_a, keys_b = set(a.keys()), set(b.keys())
        report["only_in_a"] = sorted(keys_a - keys_b)[:5]
        report["only_in_b"] = sorted(keys_b - keys_a)[:5]
        for key in sorted(keys_a & keys_b):
            x, y = a.get_tensor(key), b.get_tensor(key)
            report["keys"] += 1
            if x.dtype != y.dtype or x.shape != y.shape:
                report["mismatched"].append(f"{key}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
                continue
            report["elements"] += x.numel()
            if not x.is_floating_point():
                report["elements_differing"] += int((x != y).sum())
                continue
            report["elements_differing"] += int((x != y).sum())
            diff = float((x.to(torch.float64) - y.to(torch.float64)).abs().max()) if x.numel() else 0.0
            ulps = int((ordered(x) - ordered(y)).abs().max()) if x.dtype == torch.float16 and x.numel() else 0
            if ulps > report["max_ulp_diff"] or (ulps == report["max_ulp_diff"] and diff > report["max_abs_diff"]):
                report["worst_key"] = key
            report["max_abs_diff"] = max(report["max_abs_diff"], diff)
            report["max_ulp_diff"] = max(report["max_ulp_diff"], ulps)
    report["mismatched"] = report["mismatched"][:5]
    return report


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "reference":
        reference_merge(args[0], args[1:])
    elif command == "mecha":
        mecha_merge(args[0], args[1], args[2:])
    elif command == "compare":
        print(json.dumps(compare(args[0], args[1])))
    else:
        print(f"unknown command {command!r}: reference, mecha or compare", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
