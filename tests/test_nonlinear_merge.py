"""Non-linear methods end to end: the streamed file against the method's plain tensor function,
dropout the same whatever the threads and chunks, mixed recipes, and bad parameters."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_engine import methods
from merge_engine.errors import NonFiniteError, RecipeError
from merge_engine.execute import ExecOptions, merge
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver
from merge_engine.synthetic import tiny_state_dict

torch.set_num_threads(1)
CHUNK = 1 << 12  # small, so that most tensors take several chunks and every pass crosses them


def run(recipe: dict, root: Path, out: Path, **options) -> dict[str, torch.Tensor]:
    merge_plan = plan(parse_recipe(recipe), FileResolver(root))
    try:
        merge(merge_plan, out, options=ExecOptions(**options), overwrite=True)
    finally:
        merge_plan.close()
    return load_file(out)


@pytest.fixture
def models(make_model):
    return [make_model(f"m{i}.safetensors", seed=i) for i in range(4)]


CASES = {
    "ties": ({"k": 0.3, "vote_sgn": True}, lambda b, xs, key: methods.ties(b, xs, k=0.3, vote_sgn=True, key=key)),
    "ties_soup": ({"k": 0.5}, lambda b, xs, key: methods.ties(b, xs, k=0.5, key=key)),
    "dare": ({"probability": 0.7, "seed": 5, "alpha": 0.5},
             lambda b, xs, key: methods.dare(b, xs, probability=0.7, seed=5, alpha=0.5, key=key)),
    "della": ({"probability": 0.5, "della_eps": 0.2, "seed": 3},
              lambda b, xs, key: methods.della(b, xs, probability=0.5, della_eps=0.2, seed=3, key=key)),
    "tgmd": ({"k": 0.4, "probability": 0.3, "apply_median": True, "seed": 2},
             lambda b, xs, key: methods.ties(b, xs, k=0.4, probability=0.3, apply_median=True, seed=2, key=key)),
    "geometric_median": ({}, lambda b, xs, key: methods.geometric_median(xs, key=key)),
    "model_stock": ({}, lambda b, xs, key: methods.model_stock(b, xs, key=key)),
}


def node(name: str, params: dict, paths: list[Path]) -> dict:
    method = {"ties_soup": "ties", "tgmd": "ties"}.get(name, name)
    models = [str(p) for p in paths[1:]]
    if method == "geometric_median":
        return {"method": method, "models": models, **params}
    return {"method": method, "base": str(paths[0]), "models": models, **params}


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_file_equals_the_plain_tensor_function(name, models, tmp_path):
    params, plain = CASES[name]
    recipe = {"merge": node(name, params, models), "output": {"dtype": "fp32"}}
    merged = run(recipe, tmp_path, tmp_path / "out.safetensors", chunk_elements=CHUNK)
    states = [load_file(p) for p in models]
    compared = 0
    for key, value in merged.items():
        if not value.is_floating_point():
            assert torch.equal(value, states[0][key])
            continue
        expected = plain(states[0][key].float(), [s[key].float() for s in states[1:]], key)
        # the Gram-weighted sums run through the native kernel, in another order than torch's
        assert torch.allclose(value, expected, rtol=1e-6, atol=1e-6), key
        compared += value.numel()
    assert compared > 100_000


def test_dropout_is_identical_across_threads_and_chunk_sizes(models, tmp_path):
    recipe = {"merge": node("tgmd", {"k": 0.4, "probability": 0.5, "apply_median": True, "seed": 9}, models)}
    digests = set()
    for threads, chunk in ((1, 1 << 21), (3, CHUNK), (3, 5000)):
        out = tmp_path / f"out-{threads}-{chunk}.safetensors"
        run(recipe, tmp_path, out, threads=threads, chunk_elements=chunk)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_a_seed_changes_the_mask_and_p0_is_plain_ties(models, tmp_path):
    base = {"k": 0.3}
    a = run({"merge": node("ties", {**base, "probability": 0.5, "seed": 1}, models)}, tmp_path, tmp_path / "a.st")
    b = run({"merge": node("ties", {**base, "probability": 0.5, "seed": 2}, models)}, tmp_path, tmp_path / "b.st")
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(a[key], b[key])
    plain = run({"merge": node("ties", base, models)}, tmp_path, tmp_path / "c.st")
    p0 = run({"merge": node("ties", {**base, "probability": 0.0, "seed": 7}, models)}, tmp_path, tmp_path / "d.st")
    assert all(torch.equal(plain[k], p0[k]) for k in plain)


def test_ties_unet_with_a_uniform_text_encoder_and_nesting(models, tmp_path):
    paths = [str(p) for p in models]
    ties = {"method": "ties", "base": paths[0], "models": paths[1:], "k": 0.5}
    recipe = {"merge": ties, "components": {"text_encoder": {"method": "uniform", "models": paths[1:]}},
              "output": {"dtype": "fp32"}}
    merged = run(recipe, tmp_path, tmp_path / "mixed.safetensors")
    states = [load_file(p) for p in models]
    te_key = next(k for k in merged if k.startswith("cond_stage_model.") and merged[k].is_floating_point())
    expected = sum(s[te_key].double() for s in states[1:]) / 3
    assert torch.allclose(merged[te_key].double(), expected, atol=1e-6)
    unet_key = "model.diffusion_model.out.2.weight"
    ties_only = methods.ties(states[0][unet_key].float(), [s[unet_key].float() for s in states[1:]], k=0.5,
                             key=unet_key)
    assert torch.allclose(merged[unet_key], ties_only, atol=1e-6)
    # a non-linear node inside a linear one: half TIES, half the first model
    half = run({"merge": {"method": "weighted", "models": [{"model": ties, "weight": 1}, paths[1]]},
                "output": {"dtype": "fp32"}}, tmp_path, tmp_path / "half.safetensors")
    assert torch.allclose(half[unet_key], (ties_only + states[1][unet_key].float()) / 2, atol=1e-6)


def test_plan_shows_the_evaluation_and_the_sources(models, tmp_path):
    recipe = parse_recipe({"merge": node("ties", {"k": 0.5}, models)})
    merge_plan = plan(recipe, FileResolver(tmp_path))
    try:
        unet = merge_plan.to_dict()["components"]["unet"]
        assert unet["evaluation"]["method"] == "ties" and unet["evaluation"]["k"] == 0.5
        assert [s["model"] for s in unet["sources"]] == [p.name for p in models]
    finally:
        merge_plan.close()


def test_a_non_finite_input_is_named_even_where_ties_would_drop_it(make_model, models, tmp_path):
    state = tiny_state_dict("sd2", seed=8)
    state["model.diffusion_model.out.2.weight"][0, 0, 0, 0] = float("nan")
    bad = make_model("bad.safetensors", state=state)
    recipe = {"merge": {"method": "ties", "base": str(models[0]), "models": [str(models[1]), str(bad)], "k": 0.2}}
    with pytest.raises(NonFiniteError) as error:
        run(recipe, tmp_path, tmp_path / "out.safetensors")
    assert error.value.model == "bad.safetensors" and error.value.key == "model.diffusion_model.out.2.weight"
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("method,field,value", [
    ("ties", "k", 0.0), ("ties", "k", 1.5), ("ties", "probability", -0.1), ("dare", "probability", 1.1),
    ("ties", "maxiter", -1), ("geometric_median", "eps", 0.0), ("model_stock", "cos_eps", -1.0),
    ("slerp", "alpha", 2.0), ("della", "della_eps", 3.0), ("ties", "alpha", float("inf")), ("ties", "colour", 1),
])
def test_every_parameter_out_of_range_names_the_method_and_field(method, field, value):
    inputs = {"a": "x", "b": "y"} if method == "slerp" else {"models": ["x", "y"]} if method == "geometric_median" \
        else {"base": "x", "models": ["y"]}
    with pytest.raises(RecipeError) as error:
        parse_recipe({"merge": {"method": method, **inputs, field: value}})
    assert f"merge.{method}.{field}" in str(error.value)


def test_cli_exit_2_names_the_method_and_field(models, tmp_path):
    recipe = tmp_path / "bad.json"
    recipe.write_text(json.dumps({"merge": node("ties", {"k": 2}, models)}))
    done = subprocess.run([sys.executable, "-m", "merge_engine.cli", "merge", str(recipe), "-o",
                           str(tmp_path / "o.safetensors")], capture_output=True, text=True)
    assert done.returncode == 2 and "merge.ties.k" in done.stderr, done.stderr


def test_the_recipe_schema_holds_every_method_and_its_ranges():
    from merge_engine.recipe import recipe_schema

    schema = recipe_schema()["$defs"]
    assert {"Ties", "Dare", "Della", "GeometricMedian", "ModelStock", "Slerp", "TaskArithmetic"} <= set(schema)
    number, per_block = schema["Ties"]["properties"]["k"]["oneOf"]  # a number, or one per UNet block
    assert number["exclusiveMinimum"] == 0 and per_block == {"$ref": "#/$defs/BlockWeights"}


@pytest.mark.parametrize("name", ["ties", "dare", "tgmd", "geometric_median"])
def test_native_kernels_and_torch_path_write_the_same_file(name, models, tmp_path, monkeypatch):
    recipe = {"merge": node(name, CASES[name][0], models)}
    native = tmp_path / "native.safetensors"
    run(recipe, tmp_path, native, chunk_elements=CHUNK)
    monkeypatch.setenv("SDMERGE_NATIVE", "0")
    portable = tmp_path / "torch.safetensors"
    run(recipe, tmp_path, portable, chunk_elements=CHUNK)
    assert native.read_bytes() == portable.read_bytes()


def test_cli_plan_shows_a_non_linear_evaluation_in_words(models, tmp_path):
    recipe = tmp_path / "ties.json"
    recipe.write_text(json.dumps({"merge": node("ties", {"k": 0.5}, models),
                                  "components": {"vae": str(models[1])}}))
    done = subprocess.run([sys.executable, "-m", "merge_engine.cli", "plan", str(recipe)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ties(alpha=1.0, k=0.5, vote_sgn=False" in done.stdout and "base=m0.safetensors" in done.stdout
    assert "models=[m1.safetensors, m2.safetensors, m3.safetensors]" in done.stdout
    assert "+1.000000  m1.safetensors" in done.stdout  # the VAE, a plain copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
@pytest.mark.parametrize("name", ["ties", "dare", "della", "tgmd", "geometric_median", "model_stock"])
def test_a_gpu_merge_equals_the_cpu_merge(name, models, tmp_path):
    recipe = {"merge": node(name, CASES[name][0], models), "output": {"dtype": "fp32"}}
    cpu = run(recipe, tmp_path, tmp_path / "cpu.safetensors")
    gpu = run(recipe, tmp_path, tmp_path / "gpu.safetensors", device="cuda")
    for key, value in cpu.items():  # the same masks and thresholds; sums in another order
        assert torch.allclose(value.double(), gpu[key].double(), rtol=1e-5, atol=1e-6), key
