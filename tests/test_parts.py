"""Parts: components written alone (and loaded back as the same tensors), checkpoints assembled
from parts with SDXL's clip_l and clip_g named apart, fp8 outputs per component against an
independent decoding of the formats, and keys dropped by pattern."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge_engine.cli import main
from merge_engine.errors import LayoutMismatchError, RecipeError
from merge_engine.execute import merge
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver

torch.set_num_threads(1)


def write(tmp_path, recipe, name="out.safetensors"):
    merge_plan = plan(parse_recipe(recipe), FileResolver(tmp_path / "models"))
    try:
        merge(merge_plan, tmp_path / name)
        return merge_plan, load_file(tmp_path / name)
    finally:
        merge_plan.close()


def test_a_vae_alone_is_a_standalone_vae_and_a_text_encoder_alone_keeps_its_names(make_model, tmp_path):
    model = make_model("m.safetensors", seed=1)
    full = load_file(model)
    _, vae = write(tmp_path, {"merge": str(model), "output": {"components": ["vae"], "dtype": "fp32"}}, "vae.safetensors")
    assert set(vae) == {k.removeprefix("first_stage_model.") for k in full if k.startswith("first_stage_model.")}
    for key, value in vae.items():
        assert torch.equal(value, full["first_stage_model." + key].float()), key
    _, te = write(tmp_path, {"merge": str(model), "output": {"components": ["text_encoder"]}}, "te.safetensors")
    assert set(te) == {k for k in full if k.startswith("cond_stage_model.")}
    assert all(torch.equal(te[k], full[k]) for k in te)
    # Both load back as components: a checkpoint assembled from the parts equals the original.
    for name in ("vae.safetensors", "te.safetensors"):
        (tmp_path / "models" / name).write_bytes((tmp_path / name).read_bytes())
    _, assembled = write(tmp_path, {"merge": str(model), "components": {"vae": "vae.safetensors", "text_encoder": "te.safetensors"}},
                         "assembled.safetensors")
    assert set(assembled) == set(full) and all(torch.equal(assembled[k], full[k]) for k in full)


def test_sdxl_clip_l_and_clip_g_come_from_different_models(make_model, tmp_path):
    a, b, c = (make_model(f"{n}.safetensors", "sdxl", seed=s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    merge_plan, out = write(tmp_path, {"merge": str(a), "components": {"clip_l": str(b), "clip_g": {"method": "uniform",
                                       "models": [str(b), str(c)]}}, "output": {"dtype": "fp32", "accumulate": "fp64"}})
    assert set(merge_plan.canonical_recipe.components) == {"text_encoder", "text_encoder_2"}
    ta, tb, tc = (load_file(p) for p in (a, b, c))
    l_key = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    g_key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.equal(out[l_key], tb[l_key].float())
    assert torch.allclose(out[g_key], ((tb[g_key].double() + tc[g_key].double()) / 2).float())
    unet = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    assert torch.equal(out[unet], ta[unet].float())
    with pytest.raises(RecipeError, match="named twice"):
        parse_recipe({"merge": "a", "components": {"clip_l": "b", "text_encoder": "c"}})


def fp8_values(exponent_bits: int, mantissa_bits: int, fn: bool) -> list[float]:
    """Every finite value of an fp8 format, decoded from its bits by the format's definition."""
    bias = 2 ** (exponent_bits - 1) - 1
    out = []
    for code in range(1 << (exponent_bits + mantissa_bits)):
        e, m = code >> mantissa_bits, code & ((1 << mantissa_bits) - 1)
        top = (1 << exponent_bits) - 1
        if fn and e == top and m == (1 << mantissa_bits) - 1:
            continue  # e4m3fn: S.1111.111 is NaN, and there is no infinity
        if not fn and e == top:
            continue  # e5m2: infinities and NaNs, as in IEEE
        value = (m / (1 << mantissa_bits)) * 2 ** (1 - bias) if e == 0 else (1 + m / (1 << mantissa_bits)) * 2 ** (e - bias)
        out += [value, -value]
    return sorted(set(out))


def nearest_even(x: float, grid: list[float], mantissa_bits: int) -> float:
    """Round to nearest, ties to the value whose last mantissa bit is 0."""
    best = min(grid, key=lambda v: abs(v - x))
    tied = [v for v in grid if abs(v - x) == abs(best - x)]
    if len(tied) == 1:
        return best

    def even(v: float) -> bool:
        if v == 0:
            return True
        frac, exp = math.frexp(abs(v))  # v = frac * 2^exp, frac in [0.5, 1)
        return int(round(frac * 2 ** (mantissa_bits + 1))) % 2 == 0 or abs(v) < 2 ** -6

    return next(v for v in tied if even(v))


@pytest.mark.parametrize(("dtype", "bits", "torch_dtype"), [("fp8_e4m3fn", (4, 3, True), torch.float8_e4m3fn),
                                                            ("fp8_e5m2", (5, 2, False), torch.float8_e5m2)])
def test_fp8_outputs_round_by_the_format_and_round_trip(make_model, tmp_path, dtype, bits, torch_dtype):
    model = make_model("m.safetensors", seed=1)
    other = make_model("o.safetensors", seed=2)
    recipe = {"merge": {"method": "uniform", "models": [str(model), str(other)]},
              "output": {"dtype": "fp16", "component_dtypes": {"unet": dtype, "clip_l": "fp32"}}}
    _, out = write(tmp_path, recipe)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        header = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert header[key] == dtype.replace("fp8_e4m3fn", "F8_E4M3").replace("fp8_e5m2", "F8_E5M2")
    assert header["cond_stage_model.model.token_embedding.weight"] == "F32"  # clip_l is SD2's text encoder here
    assert header["first_stage_model.decoder.conv_in.weight"] == "F16"
    a, b = load_file(model), load_file(other)
    grid = fp8_values(*bits)
    exact = ((a[key].double() + b[key].double()) / 2).flatten().tolist()
    got = out[key].double().flatten().tolist()
    assert got == [nearest_even(x, grid, bits[1]) for x in exact]
    # An fp8 file merged again reads its values exactly: a one-model merge into fp8 changes nothing.
    (tmp_path / "models" / "fp8.safetensors").write_bytes((tmp_path / "out.safetensors").read_bytes())
    _, again = write(tmp_path, {"merge": "fp8.safetensors", "output": {"component_dtypes": {"unet": dtype}}}, "again.safetensors")
    assert torch.equal(again[key].view(torch.uint8), out[key].view(torch.uint8))
    assert out[key].dtype == torch_dtype


def test_fp8_overflow_is_an_error_naming_the_key(make_model, tmp_path):
    from merge_engine.synthetic import tiny_state_dict

    state = tiny_state_dict("sd2", seed=1, dtype=torch.float32)
    key = "model.diffusion_model.out.2.weight"
    state[key] = state[key] * 0 + 1000.0
    model = make_model("big.safetensors", state=state)
    with pytest.raises(Exception, match="overflow") as caught:
        write(tmp_path, {"merge": str(model), "output": {"component_dtypes": {"unet": "fp8_e4m3fn"}}})
    assert caught.value.key == key
    assert not (tmp_path / "out.safetensors").exists()


def test_drop_keys_and_component_selection_errors(make_model, tmp_path):
    model = make_model("m.safetensors", seed=1)
    merge_plan, out = write(tmp_path, {"merge": str(model), "output": {"drop_keys": [r"\.attn2\.", "^nothing"]}})
    full = load_file(model)
    assert set(out) == {k for k in full if ".attn2." not in k}
    assert any("matched no key" in w and "^nothing" in w for w in merge_plan.warnings)
    with pytest.raises(RecipeError, match="not a regular expression"):
        parse_recipe({"merge": "a", "output": {"drop_keys": ["("]}})
    with pytest.raises(RecipeError, match="drops every key"):
        plan(parse_recipe({"merge": str(model), "output": {"drop_keys": ["."]}}), FileResolver(tmp_path / "models"))
    te_only = make_model("te.safetensors", seed=2, components=["text_encoder"])
    with pytest.raises(LayoutMismatchError, match="asks for vae"):
        plan(parse_recipe({"merge": str(te_only), "output": {"components": ["vae"]}}), FileResolver(tmp_path / "models"))


def test_the_cli_exports_a_part_and_assembles_a_checkpoint_in_one_line(make_model, tmp_path, capsys):
    a, b = make_model("a.safetensors", "sdxl", seed=1), make_model("b.safetensors", "sdxl", seed=2)
    vae = tmp_path / "models" / "vae.safetensors"
    assert main(["export", str(b), "vae", "-o", str(vae)]) == 0
    assert all(not k.startswith("first_stage_model.") for k in load_file(vae))
    assert main(["assemble", "--unet", str(a), "--clip-l", str(b), "--vae", str(vae), "-o",
                 str(tmp_path / "parts.safetensors")]) == 0
    out, ta, tb = (load_file(p) for p in (tmp_path / "parts.safetensors", a, b))
    assert set(out) == set(ta)
    for key in out:
        source = tb if key.startswith(("first_stage_model.", "conditioner.embedders.0.")) else ta
        assert torch.equal(out[key], source[key]), key
    with safe_open(str(tmp_path / "parts.safetensors"), "np") as f:
        recipe = json.loads(f.metadata()["sdmerge_recipe"])
    assert set(recipe["components"]) == {"text_encoder", "vae"}
