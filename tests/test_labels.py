"""ModelSpec labels: the keys each architecture gets, the hash sealed into the header after the
data (checked against an independent AutoV3 of the written file), what the recipe may set and
what it may not; and EMA weights kept and merged as the UNet is."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from merge_engine.cli import main
from merge_engine.errors import LayoutMismatchError, RecipeError
from merge_engine.execute import ExecOptions, merge
from merge_engine.hashing import hash_file
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver

torch.set_num_threads(1)


def independent_autov3(path) -> str:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + length:]).hexdigest()


def metadata_of(path) -> dict[str, str]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length])["__metadata__"]


def run(tmp_path, recipe, name="out.safetensors", **kwargs):
    merge_plan = plan(parse_recipe(recipe), FileResolver(tmp_path / "models"))
    try:
        return merge_plan, merge(merge_plan, tmp_path / name, **kwargs)
    finally:
        merge_plan.close()


@pytest.mark.parametrize("block_bytes", [4096, 8 << 20])
def test_the_sealed_hash_is_the_autov3_of_the_written_file(make_model, tmp_path, block_bytes):
    a, b = make_model("a.safetensors", "sd1", seed=1), make_model("b.safetensors", "sd1", seed=2)
    merge_plan, result = run(tmp_path, {"name": "My Mix", "merge": {"method": "uniform", "models": [str(a), str(b)]}},
                             options=ExecOptions(block_bytes=block_bytes, chunk_elements=1024), compute_sha256=True)
    out = tmp_path / "out.safetensors"
    meta = metadata_of(out)
    assert meta["modelspec.hash_sha256"] == "0x" + independent_autov3(out) == "0x" + result.autov3
    assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert hash_file(out, use_cache=False).autov3 == result.autov3
    assert result.metadata == meta  # what the service records is what the file says
    assert {k: v for k, v in meta.items() if k.startswith("modelspec.") and k != "modelspec.hash_sha256"} == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "My Mix",
        "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon",
        "modelspec.merged_from": "a, b",
    }
    assert len(out.read_bytes()) == merge_plan.output_size
    # The same recipe over the same inputs is the same file, hash included.
    _, again = run(tmp_path, {"name": "My Mix", "merge": {"method": "uniform", "models": [str(a), str(b)]}},
                   name="again.safetensors", compute_sha256=True)
    assert again.sha256 == result.sha256


def test_without_a_requested_sha256_the_hash_is_sealed_from_the_pass_alone(make_model, tmp_path):
    a = make_model("a.safetensors", "sdxl", seed=1)
    _, result = run(tmp_path, {"merge": str(a), "output": {"dtype": "fp32"}})
    out = tmp_path / "out.safetensors"
    assert result.sha256 is None
    meta = metadata_of(out)
    assert meta["modelspec.hash_sha256"] == "0x" + independent_autov3(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.resolution"] == "1024x1024"
    source = load_file(a)
    assert all(torch.equal(v, source[k].to(v.dtype)) for k, v in load_file(out).items())


def test_sd2_prediction_type_comes_from_the_inputs_labels_or_the_recipe(make_model, tmp_path):
    plain = make_model("plain.safetensors", seed=1)
    merge_plan, _ = run(tmp_path, {"merge": str(plain)})
    assert merge_plan.metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert merge_plan.metadata["modelspec.resolution"] == "768x768"
    assert any("768-v" in w for w in merge_plan.warnings)

    base = make_model("base.safetensors", seed=2, metadata={"modelspec.architecture": "stable-diffusion-v2-512",
                                                             "modelspec.title": "SD 2.1 base"})
    merge_plan, _ = run(tmp_path, {"merge": str(base)}, name="base-out.safetensors")
    assert merge_plan.metadata["modelspec.architecture"] == "stable-diffusion-v2-512"
    assert merge_plan.metadata["modelspec.prediction_type"] == "epsilon"
    assert merge_plan.metadata["modelspec.merged_from"] == "SD 2.1 base"
    assert not any("768-v" in w for w in merge_plan.warnings)

    given = {"modelspec.prediction_type": "epsilon", "modelspec.date": "2026-12-07", "modelspec.author": "me"}
    merge_plan, _ = run(tmp_path, {"merge": str(plain), "output": {"metadata": given}}, name="given.safetensors")
    assert merge_plan.metadata["modelspec.architecture"] == "stable-diffusion-v2-512"
    assert merge_plan.metadata["modelspec.resolution"] == "512x512"
    assert merge_plan.metadata["modelspec.date"] == "2026-12-07"
    assert merge_plan.metadata["modelspec.author"] == "me"


def test_parts_are_labelled_as_components(make_model, tmp_path):
    model = make_model("m.safetensors", "sdxl", seed=1)
    merge_plan, _ = run(tmp_path, {"merge": str(model), "output": {"components": ["vae"]}})
    assert merge_plan.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/vae"
    assert "modelspec.resolution" not in merge_plan.metadata
    merge_plan, _ = run(tmp_path, {"merge": str(model), "output": {"components": ["clip_l", "clip_g"]}}, "te.safetensors")
    assert merge_plan.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/text-encoder"


def test_bad_labels_are_refused_and_labels_can_be_turned_off(make_model, tmp_path):
    model = make_model("m.safetensors", "sd1", seed=1)
    with pytest.raises(RecipeError, match="modelspec.hash_sha256"):
        parse_recipe({"merge": str(model), "output": {"metadata": {"modelspec.hash_sha256": "0x00"}}})
    with pytest.raises(RecipeError, match="not a sd1 architecture"):
        run(tmp_path, {"merge": str(model), "output": {"metadata": {"modelspec.architecture": "stable-diffusion-xl-v1-base"}}})
    with pytest.raises(RecipeError, match="prediction_type"):
        run(tmp_path, {"merge": str(model), "output": {"metadata": {"modelspec.prediction_type": "flow"}}})
    assert not (tmp_path / "out.safetensors").exists()
    merge_plan, result = run(tmp_path, {"merge": str(model), "output": {"modelspec": False}}, compute_sha256=True)
    assert not any(k.startswith("modelspec.") for k in metadata_of(tmp_path / "out.safetensors"))
    assert merge_plan.hash_slot is None and result.autov3 is None
    assert result.sha256 == hashlib.sha256((tmp_path / "out.safetensors").read_bytes()).hexdigest()
    # The default leaves the canonical recipe (and its hash) as it was before the option.
    assert "modelspec" not in parse_recipe({"merge": "x.safetensors"}).canonical_json()


def test_inspect_checks_the_sealed_hash(make_model, tmp_path, capsys, write_recipe):
    model = make_model("m.safetensors", "sd1", seed=1)
    assert main(["plan", str(write_recipe({"name": "one", "merge": str(model)}))]) == 0
    assert "modelspec: stable-diffusion-v1, epsilon, title 'one'" in capsys.readouterr().out
    run(tmp_path, {"merge": str(model)})
    out = tmp_path / "out.safetensors"
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modelspec"]["hash_ok"] is True
    raw = bytearray(out.read_bytes())
    raw[-1] ^= 1  # one bit of the data changes: the label no longer matches
    out.write_bytes(bytes(raw))
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modelspec"]["hash_ok"] is False


def test_kept_ema_is_merged_as_the_unet_is(make_model, tmp_path):
    a = make_model("a.safetensors", "sd1", seed=1, ema=True)
    b = make_model("b.safetensors", "sd1", seed=2, ema=True)
    recipe = {"merge": {"method": "weighted", "models": [{"model": str(a), "weight": 0.25}, {"model": str(b), "weight": 0.75}]},
              "output": {"dtype": "fp32", "accumulate": "fp64", "ema": "keep"}}
    merge_plan, _ = run(tmp_path, recipe)
    out, ta, tb = load_file(tmp_path / "out.safetensors"), load_file(a), load_file(b)
    ema = [k for k in ta if k.startswith("model_ema.")]
    assert ema and set(ema) <= set(out)
    for key in ema:
        if key in ("model_ema.decay", "model_ema.num_updates"):
            assert torch.equal(out[key], ta[key]), key
            continue
        expected = (0.25 * ta[key].double() + 0.75 * tb[key].double()).float()
        assert torch.equal(out[key], expected), key
    assert not any("EMA tensors" in w for w in merge_plan.warnings)
    dropped, _ = run(tmp_path, {**recipe, "output": {"dtype": "fp32"}}, name="dropped.safetensors")
    assert not any(k.startswith("model_ema.") for k in load_file(tmp_path / "dropped.safetensors"))
    assert any("EMA tensors" in w for w in dropped.warnings)


def test_kept_ema_needs_every_unet_source_to_have_one(make_model, tmp_path):
    a = make_model("a.safetensors", "sd1", seed=1, ema=True)
    b = make_model("b.safetensors", "sd1", seed=2)
    with pytest.raises(LayoutMismatchError, match="no EMA") as caught:
        run(tmp_path, {"merge": {"method": "uniform", "models": [str(a), str(b)]}, "output": {"ema": "keep"}})
    assert caught.value.model == "b.safetensors" and caught.value.component == "unet"
    assert not (tmp_path / "out.safetensors").exists()
