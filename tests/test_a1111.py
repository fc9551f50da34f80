"""A1111 merge metadata -> native recipe: the two real seed recipes, every refusal, resolution."""

from __future__ import annotations

import hashlib
import json
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_engine.a1111 import (
    LeafWeight,
    apply_resolution,
    convert_a1111,
    is_a1111_metadata,
    load_a1111_metadata,
    resolve_overrides,
)
from merge_engine.errors import RecipeError
from merge_engine.methods import Weighted
from merge_engine.recipe import ModelLeaf, all_leaves, parse_recipe

torch.set_num_threads(1)
SEEDS = Path(__file__).parent / "data" / "seed-recipes"


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def webui(a, b=None, c=None, method="Weighted sum", m=0.5, name="", **extra) -> dict:
    return {
        "type": "webui", "primary_model_hash": a, "secondary_model_hash": b, "tertiary_model_hash": c,
        "interp_method": method, "multiplier": m, "save_as_half": True, "custom_name": name,
        "config_source": 0, "bake_in_vae": "None", "discard_weights": "", "is_inpainting": False,
        "is_instruct_pix2pix": False, **extra,
    }


def metadata(top: dict, **models: dict) -> dict:
    return {"__metadata__": {"format": "pt", "sd_merge_recipe": top, "sd_merge_models": models}}


def entry(name: str, recipe: dict | None = None) -> dict:
    return {"name": name, "legacy_hash": "01234567", "sd_merge_recipe": recipe}


def leaves_of(metadata_: dict, **kwargs) -> dict[str | None, Fraction]:
    return {leaf.name: leaf.weight for leaf in convert_a1111(metadata_, **kwargs).leaves}


def error_of(metadata_: dict, **kwargs) -> RecipeError:
    with pytest.raises(RecipeError) as caught:
        convert_a1111(metadata_, **kwargs)
    return caught.value


# --- the seed recipes --------------------------------------------------------------------------


def test_seed_copies_are_the_published_blobs():
    source = (SEEDS / "SOURCE.md").read_text()
    for name in ("recipe-209.json", "recipe-215a.json"):
        data = (SEEDS / name).read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert re.search(rf"`{re.escape(name)}`.*Blob {blob}, {len(data)} bytes", source)


def test_recipe_209_flattens_to_ten_tenths():
    conversion = convert_a1111(load_a1111_metadata(SEEDS / "recipe-209.json"))
    assert len(conversion.leaves) == 10
    assert all(leaf.weight == Fraction(1, 10) for leaf in conversion.leaves)
    assert sum(leaf.weight for leaf in conversion.leaves) == 1
    assert len({leaf.sha256 for leaf in conversion.leaves}) == 10
    assert conversion.warnings == ()
    recipe = conversion.recipe
    assert recipe.name == "209-AstolfoMix-207208" and recipe.output.dtype == "fp16"
    assert isinstance(recipe.merge, Weighted) and recipe.merge.normalize is False
    assert [i.weight for i in recipe.merge.inputs()] == [0.1] * 10
    assert all(isinstance(leaf, ModelLeaf) and leaf.sha256 and leaf.name for leaf in all_leaves(recipe))
    assert parse_recipe(recipe.model_dump(mode="json")) == recipe
    json.dumps(conversion.tree)


def test_recipe_215a_flattens_to_sixteen_sixteenths():
    conversion = convert_a1111(load_a1111_metadata(SEEDS / "recipe-215a.json"))
    names = [leaf.name for leaf in conversion.leaves]
    assert len(names) == 16 and all(leaf.weight == Fraction(1, 16) for leaf in conversion.leaves)
    assert sum(leaf.weight for leaf in conversion.leaves) == 1
    assert [n.split("-")[0] for n in names] == [f"_{i}" for i in range(201, 217)]
    # downloaded checkpoints that carry their author's history stay leaves, and say so
    kept = [w for w in conversion.warnings if w.startswith("kept")]
    assert len(kept) == 3 and "supermerger" in kept[0] and "'hakoMayD0'" in kept[1]
    assert parse_recipe(conversion.recipe.model_dump(mode="json")) == conversion.recipe


def test_expand_all_refuses_the_supermerger_node_and_none_stops_at_the_top():
    data = load_a1111_metadata(SEEDS / "recipe-215a.json")
    error = error_of(data, expand="all")
    assert error.model == "_201-allworkforkrowk_v10768x1024.safetensors"
    assert error.details["type"] == "sd-webui-supermerger"
    top = leaves_of(data, expand="none")
    assert top == {"213a-AstolfoMix-209a210a.safetensors": Fraction(1, 2),
                   "214a-AstolfoMix-211a212a.safetensors": Fraction(1, 2)}


# --- reading ----------------------------------------------------------------------------------


def test_json_string_values_equal_objects():
    data = json.loads((SEEDS / "recipe-209.json").read_text())["__metadata__"]
    as_strings = {k: json.dumps(v) if k.startswith("sd_merge") else v for k, v in data.items()}
    assert is_a1111_metadata(as_strings) and is_a1111_metadata({"__metadata__": as_strings})
    assert not is_a1111_metadata({"__metadata__": {"format": "pt"}}) and not is_a1111_metadata({})
    expected = convert_a1111(data)
    assert convert_a1111(as_strings) == expected
    assert convert_a1111({"__metadata__": as_strings}) == expected


def test_load_from_json_dump_bare_or_wrapped(tmp_path):
    data = json.loads((SEEDS / "recipe-209.json").read_text())["__metadata__"]
    (tmp_path / "bare.json").write_text(json.dumps(data))
    assert load_a1111_metadata(tmp_path / "bare.json") == load_a1111_metadata(SEEDS / "recipe-209.json")
    (tmp_path / "native.json").write_text(json.dumps({"merge": "a.safetensors"}))
    with pytest.raises(RecipeError, match="no A1111 merge metadata"):
        load_a1111_metadata(tmp_path / "native.json")
    with pytest.raises(RecipeError, match="cannot read"):
        load_a1111_metadata(tmp_path / "absent.json")
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04" + bytes(range(256)))
    with pytest.raises(RecipeError, match="neither a JSON dump nor a .safetensors file"):
        load_a1111_metadata(tmp_path / "model.ckpt")


def test_load_from_a_safetensors_header(tmp_path):
    data = json.loads((SEEDS / "recipe-215a.json").read_text())["__metadata__"]
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    path = tmp_path / "215a.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, path, metadata=strings)
    loaded = load_a1111_metadata(path)
    assert loaded["sd_merge_models"] == data["sd_merge_models"]
    assert len(convert_a1111(loaded).leaves) == 16
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors", metadata={"format": "pt"})
    with pytest.raises(RecipeError, match="no A1111 merge metadata"):
        load_a1111_metadata(tmp_path / "plain.safetensors")


# --- arithmetic -------------------------------------------------------------------------------


def test_add_difference_gives_negative_weights_and_shared_leaves_sum():
    a, b, c = sha(1), sha(2), sha(3)
    data = metadata(webui(a, b, c, "Add difference", 0.3, "out"),
                    **{a: entry("a.safetensors"), b: entry("b.safetensors"), c: entry("c.safetensors")})
    assert leaves_of(data) == {"a.safetensors": 1, "b.safetensors": Fraction(3, 10),
                               "c.safetensors": Fraction(-3, 10)}
    recipe = convert_a1111(data).recipe
    assert parse_recipe(recipe.model_dump(mode="json")) == recipe
    # A + 1 * (B - A): A cancels out and is left out, with a note
    cancel = metadata(webui(a, b, a, "Add difference", 1, "out"),
                      **{a: entry("a.safetensors"), b: entry("b.safetensors")})
    conversion = convert_a1111(cancel)
    assert [(x.name, x.weight) for x in conversion.leaves] == [("b.safetensors", 1)]
    assert any("cancel" in w for w in conversion.warnings)


def test_no_interpolation_and_fp32_output():
    a = sha(1)
    data = metadata(webui(a, method="No interpolation", name="copy", save_as_half=False),
                    **{a: entry("a.safetensors")})
    conversion = convert_a1111(data)
    assert [(x.name, x.weight) for x in conversion.leaves] == [("a.safetensors", 1)]
    assert conversion.recipe.output.dtype == "fp32"


def test_only_merges_under_their_own_name_are_expanded():
    a, b, mid, c = sha(1), sha(2), sha(3), sha(4)
    inner = webui(a, b, m=0.25, name="mid")
    models = {a: entry("a.safetensors"), b: entry("b.safetensors"), c: entry("c.safetensors")}
    as_made = metadata(webui(mid, c, name="top"), **models, **{mid: entry("sub/mid.safetensors", inner)})
    assert leaves_of(as_made) == {"a.safetensors": Fraction(3, 8), "b.safetensors": Fraction(1, 8),
                                  "c.safetensors": Fraction(1, 2)}
    renamed = metadata(webui(mid, c, name="top"), **models, **{mid: entry("mid-v2.safetensors", inner)})
    assert leaves_of(renamed) == {"mid-v2.safetensors": Fraction(1, 2), "c.safetensors": Fraction(1, 2)}
    assert len(leaves_of(renamed, expand="all")) == 3
    # an empty custom_name: A1111 named the file "0.75(a) + 0.25(b)"
    unnamed = webui(a, b, m=0.25)
    generated = metadata(webui(mid, c, name="top"), **models,
                         **{mid: entry("0.75(a) + 0.25(b).safetensors", unnamed)})
    assert len(leaves_of(generated)) == 3


# --- refusals ---------------------------------------------------------------------------------


def test_null_hash_names_the_merge_and_lists_unhashed_entries():
    a, lost = sha(1), sha(9)
    data = metadata(webui(a, None, name="top"), **{a: entry("a.safetensors"), lost: entry("lost.ckpt")})
    error = error_of(data)
    assert error.model == "top" and error.details["field"] == "secondary_model_hash"
    assert error.details["unreferenced_entries"] == ["lost.ckpt"]
    assert "had not hashed" in str(error)


def test_missing_entry_names_the_hash():
    a, b = sha(1), sha(2)
    error = error_of(metadata(webui(a, b, name="top"), **{a: entry("a.safetensors")}))
    assert error.model == b and error.details["parent"] == "top"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"type": "sd-webui-supermerger"}, "not A1111's own merger"),
        ({"interp_method": "Sigmoid"}, "unknown interp_method"),
        ({"block_weights": "1,1,1"}, "unknown keys: block_weights"),
        ({"discard_weights": "model_ema"}, "not supported"),
        ({"multiplier": "half"}, "not a finite number"),
        ({"multiplier": None}, "not a finite number"),
    ],
)
def test_unrebuildable_nodes_are_refused_by_name(change, fragment):
    a, b, mid, c = sha(1), sha(2), sha(3), sha(4)
    models = {a: entry("a.safetensors"), b: entry("b.safetensors"), c: entry("c.safetensors")}
    top = metadata({**webui(a, b, name="top"), **change}, **models)
    assert error_of(top).model == "top" and fragment in str(error_of(top))
    nested = metadata(webui(mid, c, name="top"), **models,
                      **{mid: entry("mid.safetensors", {**webui(a, b, name="mid"), **change})})
    assert error_of(nested, expand="all").model == "mid.safetensors"


def test_cycles_are_refused():
    a, b, c = sha(1), sha(2), sha(3)
    direct = metadata(webui(a, c, name="top"),
                      **{a: entry("a.safetensors", webui(a, c, name="a")), c: entry("c.safetensors")})
    assert error_of(direct).model == "a.safetensors"
    indirect = metadata(webui(a, c, name="top"), **{
        a: entry("a.safetensors", webui(b, c, name="a")),
        b: entry("b.safetensors", webui(a, c, name="b")),
        c: entry("c.safetensors"),
    })
    error = error_of(indirect)
    assert error.model == "a.safetensors" and error.details["cycle"] == [a, b, a]


def test_baked_vae_becomes_the_vae_component_at_the_top_only():
    a, b, mid, c = sha(1), sha(2), sha(3), sha(4)
    models = {a: entry("a.safetensors"), b: entry("b.safetensors"), c: entry("c.safetensors")}
    vae = "vae-ft-mse-840000-ema-pruned.safetensors"
    conversion = convert_a1111(metadata(webui(a, b, name="top", bake_in_vae=vae), **models))
    assert conversion.vae == LeafWeight(None, vae, Fraction(1))
    assert conversion.recipe.components["vae"] == ModelLeaf(name=vae)
    assert any("baked" in w for w in conversion.warnings)
    nested = metadata(webui(mid, c, name="top"), **models,
                      **{mid: entry("mid.safetensors", webui(a, b, name="mid", bake_in_vae=vae))})
    error = error_of(nested)
    assert error.model == "mid.safetensors" and "baked in below the top merge" in str(error)


def test_inpainting_is_a_warning():
    a, b = sha(1), sha(2)
    data = metadata(webui(a, b, name="top", is_inpainting=True),
                    **{a: entry("a.safetensors"), b: entry("b.safetensors")})
    assert any("inpainting" in w for w in convert_a1111(data).warnings)


def test_broken_json_strings_are_refused():
    with pytest.raises(RecipeError, match="sd_merge_models is not valid JSON"):
        convert_a1111({"sd_merge_recipe": json.dumps(webui(sha(1))), "sd_merge_models": "{oops"})


# --- resolution -------------------------------------------------------------------------------


def test_resolve_overrides_parsing():
    prefix = sha(1)[:12].upper()
    assert resolve_overrides([f"{prefix}=/m/a.safetensors", "b.safetensors=/m/b=1.safetensors",
                              f"sha256:{sha(2)}=/m/c.ckpt"]) == {
        prefix.lower(): "/m/a.safetensors", "b.safetensors": "/m/b=1.safetensors", sha(2): "/m/c.ckpt"}
    for bad in ("no-equals", "=path", "name=", "sha256:xyz=path"):
        with pytest.raises(RecipeError, match="--resolve"):
            resolve_overrides([bad])
    with pytest.raises(RecipeError, match="twice"):
        resolve_overrides(["a=/x", "a=/y"])


def test_apply_resolution_by_hash_name_and_lookup():
    a, b, c, d = sha(1), sha(2), sha(3), sha(4)
    models = {a: entry("a.safetensors"), b: entry("sub/b.safetensors"), c: entry("c.safetensors"),
              d: entry("d.safetensors")}
    mid = sha(5)
    data = metadata(webui(mid, d, name="top"), **models,
                    **{mid: entry("mid.safetensors", webui(a, b, c, "Add difference", 1, name="mid"))})
    conversion = convert_a1111(data)
    found = {"c.safetensors": Path("/found/c.safetensors")}
    overrides = resolve_overrides([f"{a[:10]}=/m/a.safetensors", "b.safetensors=/m/b.safetensors"])
    recipe, unresolved = apply_resolution(conversion, overrides, lambda leaf: found.get(leaf.name))
    assert unresolved == [LeafWeight(d, "d.safetensors", Fraction(1, 2))]
    # located leaves keep their sha256, so the plan can check the file is the one meant
    assert all_leaves(recipe) == [ModelLeaf(sha256=a, name="/m/a.safetensors"), ModelLeaf(sha256=b, name="/m/b.safetensors"),
                                  ModelLeaf(sha256=c, name="/found/c.safetensors"), ModelLeaf(sha256=d, name="d.safetensors")]
    assert [i.weight for i in recipe.merge.inputs()] == [0.5, 0.5, -0.5, 0.5]
    with pytest.raises(RecipeError, match="matches no model") as caught:
        apply_resolution(conversion, {"zzz.safetensors": "/x"}, lambda leaf: found.get(leaf.name))
    assert caught.value.model == "zzz.safetensors"


def test_apply_resolution_refuses_an_ambiguous_prefix():
    a, b = "ab" * 5 + "0" * 54, "ab" * 5 + "1" * 54
    conversion = convert_a1111(metadata(webui(a, b, name="top"),
                                        **{a: entry("a.safetensors"), b: entry("b.safetensors")}))
    with pytest.raises(RecipeError, match="several models"):
        apply_resolution(conversion, {"ab" * 5: "/x"}, lambda leaf: None)
    recipe, unresolved = apply_resolution(conversion, {}, lambda leaf: None)
    assert recipe == conversion.recipe and len(unresolved) == 2
