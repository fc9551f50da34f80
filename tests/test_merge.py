"""The engine end to end on tiny SD-shaped checkpoints, checked against an independent fp64 sum."""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge_engine.execute import ExecOptions, merge
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver

FP16_ULP_SLACK = 1  # every float tensor within one ulp of the exactly rounded result


def run(recipe: dict, base: Path, out: Path, **options) -> tuple[Path, object]:
    merge_plan = plan(parse_recipe(recipe), FileResolver(base))
    try:
        merge(merge_plan, out, options=ExecOptions(**options))
    finally:
        merge_plan.close()
    return out, merge_plan


def reference(paths_and_weights: list[tuple[Path, Fraction]], key: str) -> torch.Tensor:
    return reference_from([(load_file(p), w) for p, w in paths_and_weights], key)


def reference_from(states_and_weights: list[tuple[dict, Fraction]], key: str) -> torch.Tensor:
    """The exact weighted sum in fp64, independent of the engine's code."""
    total = None
    for state, weight in states_and_weights:
        value = state[key].double() * float(weight)
        total = value if total is None else total + value
    return total


def assert_within_one_ulp(actual: torch.Tensor, exact: torch.Tensor) -> None:
    rounded = exact.to(actual.dtype)
    up = torch.nextafter(rounded, torch.full_like(rounded, float("inf")))
    down = torch.nextafter(rounded, torch.full_like(rounded, float("-inf")))
    ok = (actual == rounded) | (actual == up) | (actual == down)
    assert bool(ok.all()), f"{(~ok).sum()} values off by more than one ulp"


def test_uniform_merge_matches_fp64_reference(make_model, tmp_path):
    paths = [make_model(f"m{i}.safetensors", seed=i) for i in range(3)]
    recipe = {"merge": {"method": "uniform", "models": [str(p) for p in paths]}}
    out, merge_plan = run(recipe, tmp_path, tmp_path / "out.safetensors")
    merged = load_file(out)
    states = [(load_file(p), Fraction(1, 3)) for p in paths]
    source = states[0][0]
    assert set(merged) == set(source)
    floats = 0
    for key, value in merged.items():
        if key in ("betas", "alphas_cumprod") or value.dtype == torch.float32:
            assert value.dtype == source[key].dtype  # schedule buffers stay fp32
            continue
        assert value.dtype == torch.float16
        assert_within_one_ulp(value, reference_from(states, key))
        floats += 1
    assert floats > 1000


def test_binary_tree_and_flat_uniform_give_identical_tensors(make_model, tmp_path):
    a, b, c, d = (str(make_model(f"{n}.safetensors", seed=i)) for i, n in enumerate("abcd"))
    tree = {"merge": {"method": "uniform", "models": [
        {"method": "uniform", "models": [a, b]}, {"method": "uniform", "models": [c, d]}]}}
    flat = {"merge": {"method": "uniform", "models": [a, b, c, d]}}
    t1, _ = run(tree, tmp_path, tmp_path / "tree.safetensors")
    t2, _ = run(flat, tmp_path, tmp_path / "flat.safetensors")
    x, y = load_file(t1), load_file(t2)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_same_recipe_same_inputs_byte_identical_whatever_the_threads(make_model, tmp_path):
    paths = [str(make_model(f"m{i}.safetensors", seed=i)) for i in range(2)]
    recipe = {"name": "twice", "merge": {"method": "weighted", "models": [{"model": paths[0], "weight": 3}, paths[1]]}}
    one, _ = run(recipe, tmp_path, tmp_path / "one.safetensors", threads=1, chunk_elements=4096)
    two, _ = run(recipe, tmp_path, tmp_path / "two.safetensors", threads=3)
    assert one.read_bytes() == two.read_bytes()


def test_components_from_other_sources_and_standalone_vae(make_model, tmp_path):
    from merge_engine.synthetic import tiny_state_dict

    a = make_model("a.safetensors", seed=1)
    b = make_model("b.safetensors", seed=2)
    te = make_model("te.safetensors", seed=3)
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in tiny_state_dict("sd2", seed=4).items()
                if k.startswith("first_stage_model.")}
    vae = make_model("vae-ft-mse.safetensors", state=vae_only)
    recipe = {"merge": {"method": "uniform", "models": [str(a), str(b)]},
              "components": {"text_encoder": str(te), "vae": str(vae)}, "output": {"dtype": "fp32"}}
    out, _ = run(recipe, tmp_path, tmp_path / "out.safetensors")
    merged = load_file(out)
    te_sd, vae_sd = load_file(te), load_file(vae)
    key = "cond_stage_model.model.token_embedding.weight"
    assert torch.equal(merged[key], te_sd[key].float())
    assert torch.equal(merged["first_stage_model.decoder.conv_out.weight"], vae_sd["decoder.conv_out.weight"].float())
    unet_key = "model.diffusion_model.out.2.weight"
    assert_within_one_ulp(merged[unet_key], reference([(a, Fraction(1, 2)), (b, Fraction(1, 2))], unet_key))


def test_add_difference_and_fp64_accumulation(make_model, tmp_path):
    a, b, c = (make_model(f"{n}.safetensors", seed=i) for i, n in enumerate("abc"))
    recipe = {"merge": {"method": "add_difference", "a": str(a), "b": str(b), "c": str(c), "alpha": 0.7},
              "output": {"dtype": "fp32", "accumulate": "fp64"}}
    out, _ = run(recipe, tmp_path, tmp_path / "out.safetensors")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    exact = reference([(a, Fraction(1)), (b, Fraction(7, 10)), (c, Fraction(-7, 10))], key)
    assert_within_one_ulp(load_file(out)[key], exact)


def test_sd1_integer_position_ids_are_copied_not_averaged(make_model, tmp_path):
    paths = [str(make_model(f"s{i}.safetensors", "sd1", seed=i)) for i in range(3)]
    out, _ = run({"merge": {"method": "uniform", "models": paths}}, tmp_path, tmp_path / "out.safetensors")
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    value = load_file(out)[key]
    assert value.dtype == torch.int64 and torch.equal(value, torch.arange(77).reshape(1, 77))


def test_sdxl_bf16_output_and_pickle_input(make_model, tmp_path):
    from merge_engine.synthetic import tiny_state_dict

    a = make_model("x1.safetensors", "sdxl", seed=1)
    ckpt = tmp_path / "models" / "x2.ckpt"
    torch.save({"state_dict": tiny_state_dict("sdxl", seed=2), "global_step": 10}, ckpt)
    out, merge_plan = run({"merge": {"method": "uniform", "models": [str(a), str(ckpt)]}, "output": {"dtype": "bf16"}},
                          tmp_path, tmp_path / "out.safetensors")
    assert merge_plan.architecture == "sdxl"
    assert set(merge_plan.components) == {"unet", "text_encoder", "text_encoder_2", "vae"}
    key = "conditioner.embedders.1.model.ln_final.weight"
    assert load_file(out)[key].dtype == torch.bfloat16


def test_output_metadata_has_canonical_recipe_and_a1111_lineage(make_model, tmp_path):
    a = make_model("a.safetensors", seed=1)
    b = make_model("b.safetensors", seed=2)
    recipe = {"name": "mix", "merge": {"method": "uniform", "models": [str(a), "b.safetensors"]}}
    merge_plan = plan(parse_recipe(recipe), FileResolver(tmp_path / "models"))
    merge_plan.close()
    out, _ = run(recipe | {"merge": {"method": "uniform", "models": [str(a), str(b)]}}, tmp_path,
                 tmp_path / "out.safetensors")
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    canonical = json.loads(meta["sdmerge_recipe"])
    leaves = canonical["merge"]["models"]
    assert [leaf["name"] for leaf in leaves] == ["a.safetensors", "b.safetensors"]
    assert all(len(leaf["sha256"]) == 64 for leaf in leaves)
    assert str(tmp_path) not in meta["sdmerge_recipe"]  # never a local path
    assert meta["sdmerge_recipe_hash"] == merge_plan.recipe_hash  # same leaves, found by name or by path
    models = json.loads(meta["sd_merge_models"])
    assert {m["name"] for m in models.values()} == {"a.safetensors", "b.safetensors"}
    assert json.loads(meta["sd_merge_recipe"])["custom_name"] == "mix"


def test_progress_and_cancel(make_model, tmp_path):
    from merge_engine.errors import MergeCancelled

    paths = [str(make_model(f"m{i}.safetensors", seed=i)) for i in range(2)]
    merge_plan = plan(parse_recipe({"merge": {"method": "uniform", "models": paths}}), FileResolver(tmp_path))
    seen = []
    out_dir = tmp_path / "out"
    with pytest.raises(MergeCancelled):
        merge(merge_plan, out_dir / "x.safetensors", options=ExecOptions(threads=1, chunk_elements=64),
              progress=seen.append, should_cancel=lambda: len(seen) > 0)
    assert not out_dir.exists()  # the folder it made is gone too
    result = merge(merge_plan, tmp_path / "y.safetensors", progress=seen.append)
    merge_plan.close()
    assert seen[-1].tensors_done == seen[-1].tensors_total == len(merge_plan.keys)
    assert seen[-1].bytes_read == seen[-1].bytes_total
    assert result.size == (tmp_path / "y.safetensors").stat().st_size


def test_device_accumulator_matches_cpu_path(make_model, tmp_path):
    """The GPU code path, run on the CPU device: same arithmetic, same bytes."""
    from merge_engine.accumulate import CpuAccumulator, DeviceAccumulator

    paths = [str(make_model(f"m{i}.safetensors", seed=i)) for i in range(3)]
    recipe = {"merge": {"method": "weighted", "models": [{"model": paths[0], "weight": 2}, paths[1], paths[2]]}}
    merge_plan = plan(parse_recipe(recipe), FileResolver(tmp_path))
    chunk = 1 << 12
    cpu = CpuAccumulator(merge_plan, torch.float32, chunk, True)
    device = DeviceAccumulator(merge_plan, torch.float32, chunk, True, torch.device("cpu"))
    compared = 0
    for key in merge_plan.keys:
        if key.kind != "float":
            continue
        for start in range(0, key.numel, chunk):
            stop = min(start + chunk, key.numel)
            assert torch.equal(cpu.sum_chunk(key, start, stop).clone(), device.sum_chunk(key, start, stop))
            compared += 1
    merge_plan.close()
    assert compared > 1000


def test_unavailable_device_is_a_clear_error(make_model, tmp_path):
    from merge_engine.errors import OptionsError

    paths = [str(make_model(f"m{i}.safetensors", seed=i)) for i in range(2)]
    merge_plan = plan(parse_recipe({"merge": {"method": "uniform", "models": paths}}), FileResolver(tmp_path))
    bad = "cuda" if not torch.cuda.is_available() else "nonsense"
    with pytest.raises(OptionsError):
        merge(merge_plan, tmp_path / "out" / "x.safetensors", options=ExecOptions(device=bad))
    merge_plan.close()
    assert not (tmp_path / "out").exists()


def test_sha256_computed_while_writing_matches_the_file(make_model, tmp_path):
    import hashlib

    paths = [str(make_model(f"m{i}.safetensors", seed=i)) for i in range(3)]
    merge_plan = plan(parse_recipe({"merge": {"method": "uniform", "models": paths}}), FileResolver(tmp_path))
    for chunk in (1 << 10, 1 << 18):  # many small items finishing out of order, and few large ones
        out = tmp_path / f"out-{chunk}.safetensors"
        result = merge(merge_plan, out, options=ExecOptions(threads=3, chunk_elements=chunk), compute_sha256=True)
        assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    merge_plan.close()


def write_unaligned(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A safetensors file whose tensors follow each other with no padding, starting with three
    fp16 values: every fp32 tensor after them sits at an offset that is not a multiple of 4."""
    import struct

    state = {"extra.odd": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), **state}
    header, blobs, offset = {}, [], 0
    for key, value in state.items():
        raw = value.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        dtype = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[value.dtype]
        header[key] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_native_kernel_and_torch_path_write_the_same_file(make_model, tmp_path, monkeypatch, dtype):
    """Mixed fp16/fp32/bf16 inputs, fp32 tensors at unaligned offsets, chunks that straddle the
    output's blocks, three threads: the native kernel and the torch path give the same bytes."""
    from merge_engine import kernels
    from merge_engine.synthetic import tiny_state_dict

    if kernels._kernels is None:
        pytest.fail("merge_engine._kernels is not built")
    paths = []
    for seed, other in enumerate([torch.float32, torch.bfloat16, torch.float32]):
        state = tiny_state_dict("sd2", seed=seed)
        for i, key in enumerate(sorted(state)):
            if i % 3 == seed % 3 and state[key].is_floating_point():
                state[key] = state[key].to(other)
        paths.append(str(write_unaligned(tmp_path / f"u{seed}.safetensors", state)))
    recipe = {"merge": {"method": "weighted", "models": [{"model": p, "weight": w} for p, w in zip(paths, (1, 2, 4), strict=True)]},
              "output": {"dtype": dtype}}
    outputs = {}
    for native in ("1", "0"):
        monkeypatch.setenv("SDMERGE_NATIVE", native)
        merge_plan = plan(parse_recipe(recipe), FileResolver(tmp_path))
        out = tmp_path / f"out-{native}.safetensors"
        result = merge(merge_plan, out, compute_sha256=True,
                       options=ExecOptions(threads=3, chunk_elements=1000, block_bytes=8192))
        merge_plan.close()
        outputs[native] = out.read_bytes()
        assert result.sha256 == hashlib.sha256(outputs[native]).hexdigest()
    assert outputs["1"] == outputs["0"]
    merged = load_file(tmp_path / "out-1.safetensors")
    states = [(load_file(p), w) for p, w in zip(paths, (Fraction(1, 7), Fraction(2, 7), Fraction(4, 7)), strict=True)]
    key = "model.diffusion_model.out.2.weight"
    if dtype == "fp32":  # an fp32 sum of three terms is within a few fp32 ulps of the exact one
        torch.testing.assert_close(merged[key].double(), reference_from(states, key), rtol=1e-6, atol=1e-7)
    else:
        assert_within_one_ulp(merged[key], reference_from(states, key))


def test_a_linear_cli_merge_never_imports_torch(make_model, write_recipe, tmp_path, monkeypatch):
    """A merge the native kernel serves whole runs in a process that never imports torch (its
    start-up is seconds on a small machine), and writes the bytes the torch path writes."""
    import subprocess
    import sys

    from merge_engine import kernels

    if kernels._kernels is None:
        pytest.fail("merge_engine._kernels is not built")
    paths = [str(make_model(f"s{i}.safetensors", "sd1", seed=i)) for i in range(3)]  # integer position_ids too
    recipe = {"merge": {"method": "weighted", "models": [{"model": p, "weight": w} for p, w in zip(paths, (1, 2, 5), strict=True)]},
              "output": {"dtype": "fp16"}}
    path, out = write_recipe(recipe), tmp_path / "lean.safetensors"
    script = ("import sys\nfrom merge_engine.cli import main\n"
              f"rc = main(['merge', {str(path)!r}, '-o', {str(out)!r}, '--quiet'])\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("SDMERGE_NATIVE", "0")
    torch_out, _ = run(recipe, tmp_path, tmp_path / "torch.safetensors")
    assert out.read_bytes() == torch_out.read_bytes()


def test_integer_tensors_agree_by_value_whatever_their_integer_type(make_model, tmp_path):
    """Some files store position_ids as int32, others as int64: the same values are one tensor
    (written as the first source's); other values are an error naming the model and key."""
    from merge_engine.errors import LayoutMismatchError
    from merge_engine.synthetic import tiny_state_dict

    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    a = make_model("a.safetensors", "sd1", seed=0)
    state = tiny_state_dict("sd1", seed=1)
    state[key] = state[key].to(torch.int32)
    b = make_model("b.safetensors", "sd1", state=state)
    out, _ = run({"merge": {"method": "uniform", "models": [str(a), str(b)]}}, tmp_path, tmp_path / "out.safetensors")
    value = load_file(out)[key]
    assert value.dtype == torch.int64 and torch.equal(value, torch.arange(77).reshape(1, 77))
    state[key] = state[key].flip(-1)
    c = make_model("c.safetensors", "sd1", state=state)
    with pytest.raises(LayoutMismatchError, match="integer tensor differs") as raised:
        run({"merge": {"method": "uniform", "models": [str(a), str(c)]}}, tmp_path, tmp_path / "bad.safetensors")
    assert (raised.value.model, raised.value.key) == ("c.safetensors", key)
    assert not (tmp_path / "bad.safetensors").exists()
