"""Block weights: every convention's list against hand-placed per-block values, per-key weights in
the plan against a hand-computed table, the merged file against an fp64 block merge, and bad maps."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from merge_engine.blocks import block_names, block_of, import_list
from merge_engine.errors import RecipeError
from merge_engine.execute import merge
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver

torch.set_num_threads(1)
SD_BLOCKS = [*(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]


@pytest.mark.parametrize(("key", "component", "block"), [
    ("model.diffusion_model.input_blocks.4.1.proj_in.weight", "unet", "IN04"),
    ("model.diffusion_model.input_blocks.11.0.in_layers.0.bias", "unet", "IN11"),
    ("model.diffusion_model.middle_block.1.norm.weight", "unet", "M00"),
    ("model.diffusion_model.output_blocks.0.0.skip_connection.weight", "unet", "OUT00"),
    ("model.diffusion_model.time_embed.0.weight", "unet", "TIME_EMBED"),
    ("model.diffusion_model.label_emb.0.0.weight", "unet", "LABEL_EMB"),
    ("model.diffusion_model.out.2.weight", "unet", "OUT"),
    ("cond_stage_model.model.token_embedding.weight", "text_encoder", "BASE"),
    ("first_stage_model.decoder.conv_in.weight", "vae", "VAE"),
])
def test_every_key_has_its_block(key, component, block):
    assert block_of(component, key) == block


def test_each_list_convention_places_every_block_as_its_tool_does():
    values = [i / 100 for i in range(27)]
    kohya = import_list(values[:25], base=0.9)
    assert kohya["convention"] == "kohya"
    assert [kohya["blocks"][b] for b in SD_BLOCKS] == values[:25]
    assert kohya["blocks"]["TIME_EMBED"] == values[0] and kohya["blocks"]["OUT"] == values[24]
    assert kohya["blocks"]["BASE"] == kohya["blocks"]["VAE"] == 0.9
    supermerger = import_list(values[:26])
    assert supermerger["convention"] == "supermerger" and supermerger["blocks"]["BASE"] == 0
    assert [supermerger["blocks"][b] for b in SD_BLOCKS] == values[1:26]
    assert supermerger["blocks"]["TIME_EMBED"] == 0 and supermerger["blocks"]["OUT"] == values[25]
    runtime = import_list(values)
    assert runtime["convention"] == "runtime-block-merge" and "BASE" not in runtime["blocks"]
    assert runtime["blocks"]["OUT"] == values[25] and runtime["blocks"]["TIME_EMBED"] == values[26]
    for count in (20, 21):
        xl = import_list(values[:count])
        assert xl["convention"] == "supermerger-sdxl" and xl["blocks"]["OUT08"] == values[19]
        assert set(xl["blocks"]) <= set(block_names("sdxl")) and ("VAE" in xl["blocks"]) == (count == 21)


def test_a_wrong_count_lists_the_conventions_it_could_have_meant():
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"merge": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": [0.5] * 24}})
    message = str(caught.value)
    assert "24 values" in message and all(n in message for n in ("kohya", "supermerger", "runtime-block-merge"))


def test_a_block_merge_weighs_every_key_by_its_block(make_model, tmp_path):
    a, b = make_model("a.safetensors", seed=1), make_model("b.safetensors", seed=2)
    alpha = {"list": [i / 24 for i in range(25)], "base": 0.25,
             "overrides": [{"keys": "*attn2*", "value": 1.0}, {"keys": "*input_blocks.1.*attn2*", "value": 0.0}]}
    recipe = {"merge": {"method": "weighted_sum", "a": str(a), "b": str(b), "alpha": alpha},
              "output": {"dtype": "fp32", "accumulate": "fp64"}}
    merge_plan = plan(parse_recipe(recipe), FileResolver(tmp_path / "models"))
    try:
        expected: dict[str, float] = {}
        for k in merge_plan.keys:
            if k.kind != "float" or k.component == "other":
                continue
            block = block_of(k.component, k.key)
            want = {"BASE": 0.25, "VAE": 0.25, "TIME_EMBED": 0.0, "OUT": 1.0}.get(block)
            if want is None:
                want = SD_BLOCKS.index(block) / 24
            if "attn2" in k.key:
                want = 0.0 if ".input_blocks.1." in k.key else 1.0
            expected[k.key] = want
            weights = {t.input: t.coefficient for t in k.terms}
            assert weights.get(1, 0.0) == want, k.key  # b's weight is alpha, exactly as written
        report = merge_plan.to_dict()["components"]["unet"]["blocks"]
        assert {o["keys"]: o["matched"] > 0 for o in report["overrides"]} == {
            "*attn2*": True, "*input_blocks.1.*attn2*": True}
        merge(merge_plan, tmp_path / "out.safetensors")
    finally:
        merge_plan.close()
    out, ta, tb = (load_file(p) for p in (tmp_path / "out.safetensors", a, b))
    for key, w in expected.items():
        want = (ta[key].double() * (1 - w) + tb[key].double() * w).float()
        assert torch.allclose(out[key], want, rtol=1e-6, atol=1e-7), key


def test_a_block_the_architecture_lacks_or_a_value_out_of_range_is_refused(make_model, tmp_path):
    a, b = make_model("a.safetensors", seed=1), make_model("b.safetensors", seed=2)
    with pytest.raises(RecipeError, match="LABEL_EMB"):
        plan(parse_recipe({"merge": {"method": "weighted_sum", "a": str(a), "b": str(b),
                                     "alpha": {"blocks": {"LABEL_EMB": 0.5}, "default": 0.5}}}),
             FileResolver(tmp_path / "models"))
    with pytest.raises(RecipeError, match="no value for block BASE"):
        plan(parse_recipe({"merge": {"method": "weighted_sum", "a": str(a), "b": str(b),
                                     "alpha": [0.5] * 27}}), FileResolver(tmp_path / "models"))
    with pytest.raises(RecipeError, match=r"merge\.ties\.k.*block IN00"):
        parse_recipe({"merge": {"method": "ties", "base": "a", "models": ["b"], "k": {"blocks": {"IN00": 1.5}}}})


def test_an_sdxl_supermerger_list_weighs_each_key_by_its_block(make_model, tmp_path):
    a = make_model("a.safetensors", "sdxl", seed=1)
    b = make_model("b.safetensors", "sdxl", seed=2)
    values = [round(i / 20, 4) for i in range(21)]  # BASE, IN00-IN08, M00, OUT00-OUT08, VAE
    recipe = {"merge": {"method": "weighted_sum", "a": str(a), "b": str(b), "alpha": values},
              "output": {"dtype": "fp32", "accumulate": "fp64"}}
    merge_plan = plan(parse_recipe(recipe), FileResolver(tmp_path / "models"))
    order = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)), "VAE"]
    placed = {**dict(zip(order, values, strict=True)), "TIME_EMBED": values[0], "LABEL_EMB": values[0],
              "OUT": values[19]}
    try:
        expected = {}
        for k in merge_plan.keys:
            if k.kind == "float" and k.component != "other":
                expected[k.key] = placed[block_of(k.component, k.key)]
                assert {t.input: t.coefficient for t in k.terms}.get(1, 0.0) == expected[k.key], k.key
        assert {block_of(k.component, k.key) for k in merge_plan.keys if k.component == "unet"} >= {
            "IN08", "OUT08", "M00", "LABEL_EMB", "TIME_EMBED", "OUT"}
        assert merge_plan.to_dict()["components"]["unet"]["blocks"]["groups"]
        merge(merge_plan, tmp_path / "out.safetensors")
    finally:
        merge_plan.close()
    out, ta, tb = (load_file(p) for p in (tmp_path / "out.safetensors", a, b))
    for key, w in expected.items():
        want = (ta[key].double() * (1 - w) + tb[key].double() * w).float()
        assert torch.allclose(out[key], want, rtol=1e-6, atol=1e-7), key
    kohya = {"method": "weighted_sum", "a": str(a), "b": str(b), "alpha": {"list": [0.5] * 25, "base": 0.5}}
    with pytest.raises(RecipeError, match="sdxl"):  # a 25-value SD list names blocks SDXL lacks
        plan(parse_recipe({"merge": kohya}), FileResolver(tmp_path / "models"))


def test_the_cli_plan_shows_each_block_value_and_override(make_model, write_recipe, capsys):
    from merge_engine.cli import main

    a, b = make_model("a.safetensors", seed=1), make_model("b.safetensors", seed=2)
    alpha = {"list": [i / 24 for i in range(25)], "base": 0.25, "overrides": [{"keys": "*attn2*", "value": 1.0}]}
    recipe = write_recipe({"merge": {"method": "weighted_sum", "a": str(a), "b": str(b), "alpha": alpha}})
    assert main(["plan", str(recipe)]) == 0
    text = capsys.readouterr().out
    assert "alpha=0.5 (M00)" in text and "+0.5*a.safetensors +0.5*b.safetensors" in text
    assert "alpha=1 (override *attn2*)" in text and "override alpha=1 for *attn2*:" in text
    assert "alpha=0.25 (BASE)" in text
