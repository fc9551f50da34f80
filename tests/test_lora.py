"""LoRA baking against an fp64 `W + s * (up @ down) * alpha / rank`, on tiny LoRA files written in
kohya's and diffusers/PEFT's key formats with module names spelled out by hand (never generated
by the code under test), and every bad LoRA refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_engine.cli import main
from merge_engine.errors import ArchitectureError, LayoutMismatchError, RecipeError, ResolveError
from merge_engine.execute import merge
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver

torch.set_num_threads(1)
U = "model.diffusion_model."
SD2_TE = "cond_stage_model.model.transformer.resblocks."

# module name -> (checkpoint key, rows of it or None): the published correspondences.
KOHYA_SD2 = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None),
    "lora_unet_up_blocks_1_attentions_2_proj_out": (U + "output_blocks.5.1.proj_out.weight", None),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (U + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", None),
    "lora_unet_down_blocks_1_resnets_0_conv1": (U + "input_blocks.4.0.in_layers.2.weight", None),  # LoCon 3x3
    "lora_unet_up_blocks_0_upsamplers_0_conv": (U + "output_blocks.2.1.conv.weight", None),
    "lora_unet_down_blocks_0_downsamplers_0_conv": (U + "input_blocks.3.0.op.weight", None),
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (SD2_TE + "0.attn.in_proj_weight", (32, 64)),
    "lora_te_text_model_encoder_layers_0_self_attn_v_proj": (SD2_TE + "0.attn.in_proj_weight", (64, 96)),
    "lora_te_text_model_encoder_layers_1_mlp_fc2": (SD2_TE + "1.mlp.c_proj.weight", None),
}
PEFT_SD2 = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", None),
    "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0": (U + "output_blocks.7.1.transformer_blocks.0.attn1.to_out.0.weight", None),
    "text_encoder.text_model.encoder.layers.1.self_attn.q_proj": (SD2_TE + "1.attn.in_proj_weight", (0, 32)),
}
KOHYA_SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", None),
    "lora_unet_output_blocks_0_1_proj_in": (U + "output_blocks.0.1.proj_in.weight", None),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", None),
    "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", (64, 96)),
}


def write_lora(path, model, modules, *, peft=False, rank=4, alpha=2.0, seed=0, trained_for=None):
    """Random factors for each module, shaped from the model's weight; the expected deltas, fp64."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for name, (key, rows) in modules.items():
        weight = model[key]
        out = rows[1] - rows[0] if rows else weight.shape[0]
        cols = weight[0].numel()
        down = torch.randn((rank, *weight.shape[1:]) if weight.dim() == 4 else (rank, cols), generator=g).half()
        up = torch.randn((out, rank, 1, 1) if weight.dim() == 4 else (out, rank), generator=g).half()
        if peft:
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
            scale = 1.0
        else:
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
            scale = alpha / rank
        delta = (up.double().reshape(out, rank) @ down.double().reshape(rank, cols)) * scale
        full = expected.setdefault(key, torch.zeros(weight.shape[0], cols, dtype=torch.float64))
        start, stop = rows or (0, weight.shape[0])
        full[start:stop] += delta
    metadata = {"ss_network_module": "networks.lora", **({"ss_base_model_version": trained_for} if trained_for else {})}
    save_file(tensors, str(path), metadata=metadata)
    return {k: v.reshape(model[k].shape) for k, v in expected.items()}


def bake(tmp_path, recipe, name="out.safetensors"):
    merge_plan = plan(parse_recipe(recipe), FileResolver(tmp_path / "models"))
    try:
        merge(merge_plan, tmp_path / name)
        return merge_plan.to_dict(), load_file(tmp_path / name)
    finally:
        merge_plan.close()


def assert_baked(out, model, deltas, strength, untouched_example):
    for key, delta in deltas.items():
        want = (model[key].double() + strength * delta).float()
        assert torch.allclose(out[key], want, rtol=1e-6, atol=1e-6), key
    assert torch.equal(out[untouched_example], model[untouched_example].float())


@pytest.mark.parametrize(("fmt", "modules"), [("kohya", KOHYA_SD2), ("peft", PEFT_SD2)])
def test_a_lora_bakes_as_w_plus_strength_times_up_down_scaled(make_model, tmp_path, fmt, modules):
    base = make_model("base.safetensors", seed=1)
    model = load_file(base)
    lora = tmp_path / "models" / "style.safetensors"
    deltas = write_lora(lora, model, modules, peft=fmt == "peft")
    recipe = {"merge": {"method": "lora", "model": str(base), "loras": [{"lora": str(lora), "strength": 0.75}]},
              "output": {"dtype": "fp32", "accumulate": "fp64"}}
    summary, out = bake(tmp_path, recipe)
    assert_baked(out, model, deltas, 0.75, U + "input_blocks.2.1.proj_in.weight")
    report = summary["loras"]["style.safetensors"]
    assert report["modules"] == len(modules) and report["unmatched"] == 0 and report["kinds"] == {"lora": len(modules)}
    assert sum(report["matched"].values()) == len(modules) and report["matched"]["text_encoder"] >= 1
    assert set(out) == set(model)


def test_sdxl_kohya_names_reach_the_unet_and_both_text_encoders(make_model, tmp_path):
    base = make_model("xl.safetensors", "sdxl", seed=3)
    model = load_file(base)
    lora = tmp_path / "models" / "xl-lora.safetensors"
    deltas = write_lora(lora, model, KOHYA_SDXL, rank=2, alpha=1.0)
    recipe = {"merge": {"method": "lora", "model": str(base), "loras": [{"lora": str(lora), "strength": -0.5}]},
              "output": {"dtype": "fp32", "accumulate": "fp64"}}
    summary, out = bake(tmp_path, recipe)
    assert_baked(out, model, deltas, -0.5, U + "input_blocks.5.1.proj_in.weight")
    assert summary["loras"]["xl-lora.safetensors"]["matched"] == {"unet": 2, "text_encoder": 1, "text_encoder_2": 1}


def test_two_loras_a_strength_per_block_and_a_merge_over_baked_models(make_model, tmp_path):
    a, b = make_model("a.safetensors", seed=1), make_model("b.safetensors", seed=2)
    ta, tb = load_file(a), load_file(b)
    one, two = tmp_path / "models" / "one.safetensors", tmp_path / "models" / "two.safetensors"
    d1 = write_lora(one, ta, KOHYA_SD2, seed=5)
    d2 = write_lora(two, ta, PEFT_SD2, peft=True, seed=6)
    strength = {"blocks": {"BASE": 0.0}, "default": 1.0, "overrides": [{"keys": "*attn2*", "value": 0.5}]}
    baked = {"method": "lora", "model": str(a), "loras": [{"lora": str(one), "strength": strength},
                                                          {"lora": str(two), "strength": 0.25}]}
    recipe = {"merge": {"method": "uniform", "models": [baked, str(b)]}, "output": {"dtype": "fp32", "accumulate": "fp64"}}
    _, out = bake(tmp_path, recipe)
    for key in set(d1) | set(d2):
        s1 = 0.0 if key.startswith("cond_stage_model.") else 0.5 if "attn2" in key else 1.0
        want = ta[key].double() + s1 * d1.get(key, 0) + 0.25 * d2.get(key, 0)
        want = ((want + tb[key].double()) / 2).float()
        assert torch.allclose(out[key], want, rtol=1e-6, atol=1e-6), key
    plain = U + "input_blocks.2.1.proj_in.weight"
    assert torch.allclose(out[plain], ((ta[plain].double() + tb[plain].double()) / 2).float())


def test_a_lora_baked_inside_ties_equals_ties_over_the_baked_file(make_model, tmp_path):
    base, m1 = make_model("base.safetensors", seed=1), make_model("m1.safetensors", seed=2)
    m2 = make_model("m2.safetensors", seed=3)
    lora = tmp_path / "models" / "style.safetensors"
    write_lora(lora, load_file(m1), KOHYA_SD2, seed=9)
    baked = {"method": "lora", "model": str(m1), "loras": [{"lora": str(lora), "strength": 0.8}]}
    output = {"dtype": "fp32", "accumulate": "fp64"}
    bake(tmp_path, {"merge": baked, "output": output}, "m1-baked.safetensors")
    _, nested = bake(tmp_path, {"merge": {"method": "ties", "base": str(base), "models": [baked, str(m2)], "k": 0.5},
                                "output": output}, "nested.safetensors")
    (tmp_path / "models" / "m1-baked.safetensors").write_bytes((tmp_path / "m1-baked.safetensors").read_bytes())
    _, staged = bake(tmp_path, {"merge": {"method": "ties", "base": str(base), "k": 0.5,
                                          "models": [str(tmp_path / "models" / "m1-baked.safetensors"), str(m2)]},
                                "output": output}, "staged.safetensors")
    for key in nested:
        assert torch.allclose(nested[key], staged[key], rtol=1e-6, atol=1e-6), key


def test_loha_and_lokr_bake_by_their_formulas(make_model, tmp_path):
    base = make_model("base.safetensors", seed=1)
    model = load_file(base)
    g = torch.Generator().manual_seed(3)
    q = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"  # 8 x 8
    conv = U + "input_blocks.4.0.in_layers.2.weight"  # 16 x 8 x 3 x 3
    r = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    hada = {"hada_w1_a": r(8, 2), "hada_w1_b": r(2, 8), "hada_w2_a": r(8, 2), "hada_w2_b": r(2, 8), "alpha": torch.tensor(1.0)}
    lokr = {"lokr_w1": r(4, 2), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(2, 4 * 9), "alpha": torch.tensor(4.0)}
    lokr["lokr_w2_b"] = lokr["lokr_w2_b"]
    tensors = {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.{k}": v for k, v in hada.items()}
    tensors |= {f"lora_unet_down_blocks_1_resnets_0_conv1.{k}": v for k, v in lokr.items()}
    save_file(tensors, str(tmp_path / "models" / "lyco.safetensors"))
    h = {k: v.double() for k, v in hada.items()}
    want_q = (h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"]) * (1.0 / 2)
    k_ = {k: v.double() for k, v in lokr.items()}
    w2 = (k_["lokr_w2_a"] @ k_["lokr_w2_b"]).reshape(4, 4, 3, 3)
    want_conv = torch.kron(k_["lokr_w1"].reshape(4, 2, 1, 1), w2) * (4.0 / 2)
    summary, out = bake(tmp_path, {"merge": {"method": "lora", "model": str(base), "loras": [{"lora": "lyco.safetensors"}]},
                                   "output": {"dtype": "fp32", "accumulate": "fp64"}})
    assert summary["loras"]["lyco.safetensors"]["kinds"] == {"loha": 1, "lokr": 1}
    assert torch.allclose(out[q], (model[q].double() + want_q).float(), rtol=1e-6, atol=1e-6)
    assert torch.allclose(out[conv], (model[conv].double() + want_conv).float(), rtol=1e-6, atol=1e-6)


def test_bad_loras_are_refused_by_name_and_nothing_is_written(make_model, tmp_path):
    base = make_model("base.safetensors", seed=1)
    xl = make_model("xl.safetensors", "sdxl", seed=2)
    models = tmp_path / "models"
    write_lora(models / "xl-lora.safetensors", load_file(xl), KOHYA_SDXL)
    write_lora(models / "sd2-lora.safetensors", load_file(base), KOHYA_SD2, trained_for="sd_v2_768_v")
    save_file({"lora_unet_foo_bar.lora_down.weight": torch.ones(2, 8), "lora_unet_foo_bar.lora_up.weight": torch.ones(8, 2)},
              str(models / "foreign.safetensors"))
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(8, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": torch.ones(8, 1)}, str(models / "dora.safetensors"))
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 99),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(8, 2)}, str(models / "wide.safetensors"))

    def refused(lora, model=base):
        recipe = {"merge": {"method": "lora", "model": str(model), "loras": [{"lora": lora}]}}
        return plan(parse_recipe(recipe), FileResolver(models))

    with pytest.raises(ArchitectureError, match="a LoRA for sdxl cannot be baked into an sd2 model") as caught:
        refused("xl-lora.safetensors")  # its names give it away: two text encoders
    assert caught.value.model == "xl-lora.safetensors"
    with pytest.raises(ArchitectureError, match="a LoRA for sd2 cannot be baked into an sdxl model") as caught:
        refused("sd2-lora.safetensors", xl)  # kohya's ss_base_model_version says so
    with pytest.raises(RecipeError, match="none of its 1 modules matches this sd2") as caught:
        refused("foreign.safetensors")
    assert caught.value.model == "foreign.safetensors"
    with pytest.raises(RecipeError, match="DoRA"):
        refused("dora.safetensors")
    with pytest.raises(LayoutMismatchError, match=r"delta of \[8, 99\]") as caught:
        refused("wide.safetensors")
    assert caught.value.key == U + "input_blocks.1.1.proj_in.weight"
    with pytest.raises(ResolveError, match="both as a checkpoint and as a LoRA"):
        refused("base.safetensors")
    make_model("other.safetensors", seed=4)
    with pytest.raises(RecipeError, match="holds no LoRA modules"):
        refused("other.safetensors")
    with pytest.raises(RecipeError, match="a LoRA is a file reference"):
        parse_recipe({"merge": {"method": "lora", "model": "a", "loras": [{"lora": 3}]}})
    assert not list(tmp_path.glob("*.safetensors"))


def test_the_cli_bakes_and_its_plan_reports_the_matches(make_model, tmp_path, capsys):
    base = make_model("base.safetensors", seed=1)
    lora = tmp_path / "models" / "style.safetensors"
    write_lora(lora, load_file(base), {**KOHYA_SD2, "lora_unet_not_a_layer": (U + "out.2.weight", None)})
    recipe = tmp_path / "bake.json"
    recipe.write_text(json.dumps({"merge": {"method": "lora", "model": str(base), "loras": [{"lora": str(lora)}]}}))
    assert main(["plan", str(recipe), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["loras"]["style.safetensors"]["unmatched"] == 1
    assert any("1 of its 10 LoRA modules match no layer" in w for w in summary["warnings"])
    assert main(["merge", str(recipe), "-o", str(tmp_path / "baked.safetensors")]) == 0
    out = load_file(tmp_path / "baked.safetensors")
    inputs = json.loads(__import__("safetensors").safe_open(str(tmp_path / "baked.safetensors"), "np").metadata()["sdmerge_inputs"])
    assert [i["name"] for i in inputs] == ["base.safetensors", "style.safetensors"]
    assert set(out) == set(load_file(base))
