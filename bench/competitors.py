"""The merges sdmerge is measured against, and the check that they all computed the same thing.

Each runs as its own process, started by merge_bench.py, so that its wall time and peak RSS
are its alone:

    .venv/bin/python bench/competitors.py reference OUT.safetensors IN.safetensors...
    /tmp/mecha-venv/bin/python bench/competitors.py mecha CONFIG.json OUT.safetensors IN...
    /tmp/mecha-venv/bin/python bench/methods_bench.py _mecha ...   (mecha_method, for methods_bench.py)
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

    spec = _register_config(config_path)
    models = [sd_mecha.model(path, config=spec["identifier"]) for path in inputs]
    sd_mecha.merge(sd_mecha.n_average(*models), output=output, output_dtype=torch.float16)


def mecha_method(config_path: str, method: str, output: str, base: str | None, inputs: list[str],
                 params: dict, device: str = "cpu") -> None:
    """sd-mecha's counterpart of one sdmerge method (methods_bench.py), on the SD2 config above.

    ties:    add_difference(base, ties_sum(*(subtract(m, base)), k, vote_sgn), alpha)
    dare:    variant "each" (default, sdmerge's `dare` exactly but for the random draws):
             add_difference(base, n_average(*(dropout(subtract(m_i, base), probability, rescale=1,
             seed=seed+i))), alpha * N): a one-delta `dropout` is m_i d_i / (1 - p), n_average divides
             by N, so the result is b + alpha * sum(m_i d_i) / (1 - p);
             variant "dropout": sd-mecha's N-way `dropout` (n-supermario: kept deltas averaged over
             the models that kept them, then / (1 - p)); variant "ties": ties_sum_with_dropout with
             k=1 (no top-k) and apply_stock=True (which in sd-mecha 1.1.x means *no* model stock),
             i.e. DARE + TIES sign election and disjoint mean.
    median:  geometric_median(*models, eps, maxiter, ftol)
    uniform: n_average(*models)
    Everything else is sd-mecha's default (fp32 merge dtype, its threads and buffers); fp16
    output, fsynced here before the process exits so its wall time includes making it durable.
    """
    import os

    import sd_mecha
    import torch
    from sd_mecha.extensions.builtin.merge_methods import linear, ties

    spec = _register_config(config_path)
    models = [sd_mecha.model(path, config=spec["identifier"]) for path in inputs]
    b = sd_mecha.model(base, config=spec["identifier"]) if base else None
    # the merge methods themselves, not sd_mecha's top-level wrappers (its `dropout` wrapper takes
    # no `rescale`, its `add_difference` wrapper cannot take a ties_sum node as its delta)
    if method == "ties":
        deltas = [linear.subtract(m, b) for m in models]
        recipe = linear.add_difference(b, ties.ties_sum(*deltas, k=params.get("k", 0.2),
                                                        vote_sgn=params.get("vote_sgn", False)),
                                       alpha=params.get("alpha", 1.0))
    elif method == "dare":
        p, seed, alpha = params.get("probability", 0.9), params.get("seed", 0), params.get("alpha", 1.0)
        rescale, variant = params.get("rescale", True), params.get("variant", "each")
        deltas = [linear.subtract(m, b) for m in models]
        if variant == "each":
            dropped = [ties.dropout(d, probability=p, rescale=1.0 if rescale else 0.0, seed=seed + i)
                       for i, d in enumerate(deltas)]
            recipe = linear.add_difference(b, linear.n_average(*dropped), alpha=alpha * len(models))
        elif variant == "dropout":
            merged = ties.dropout(*deltas, probability=p, rescale=1.0 if rescale else 0.0, seed=seed)
            recipe = linear.add_difference(b, merged, alpha=alpha)
        elif variant == "ties":
            merged = ties.ties_sum_with_dropout(*deltas, probability=p, rescale=rescale, k=1.0,
                                                apply_stock=True, seed=seed)
            recipe = linear.add_difference(b, merged, alpha=alpha)
        else:
            raise ValueError(f"unknown dare variant {variant!r}: each, dropout or ties")
    elif method == "median":
        recipe = ties.geometric_median(*models, eps=params.get("eps", 1e-6),
                                       maxiter=params.get("maxiter", 100), ftol=params.get("ftol", 1e-20))
    elif method == "uniform":
        recipe = linear.n_average(*models)
    else:
        raise ValueError(f"unknown method {method!r}: ties, dare, median or uniform")
    sd_mecha.merge(recipe, output=output, output_dtype=torch.float16, merge_dtype=torch.float32,
                   merge_device=device)
    fd = os.open(output, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _register_config(config_path: str) -> dict:
    """Register the SD2 model config merge_bench.py wrote with sd-mecha; returns its spec."""
    from sd_mecha.extensions import model_configs

    with open(config_path, encoding="utf-8") as f:
        spec = json.load(f)
    components = {
        name: model_configs.ModelComponent({key: {"shape": shape, "dtype": dtype}
                                            for key, (shape, dtype) in keys.items()})
        for name, keys in spec["components"].items()
    }
    model_configs.register(model_configs.ModelConfigImpl(spec["identifier"], components))
    return spec


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
