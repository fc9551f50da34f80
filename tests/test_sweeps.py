"""Sweeps: every kind against the same variant merged to disk with `sdmerge merge` and previewed
from the file; leave-one-out and weight variants derived from the anchor's fp64 sums, byte for
byte; XY tables; topics; bad sweeps refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from merge_engine.cli import main as cli
from merge_engine.errors import OptionsError
from merge_engine.plan import plan
from merge_engine.preview.infotext import read_png_pixels
from merge_engine.preview.params import Sampling
from merge_engine.preview.pipeline import Anchor, PreviewModel
from merge_engine.preview.render import Target, render_previews
from merge_engine.preview.sweeps import Source, expand, parse_sweep
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver
from merge_engine.synthetic import tiny_state_dict, write_checkpoint

torch.set_num_threads(1)
pytest.importorskip("diffusers")

SMALL = dict(steps=3, width=64, height=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sweep-models")
    for arch, seeds in (("sd1", range(5)), ("sdxl", range(2))):
        for seed in seeds:
            write_checkpoint(folder / f"{arch}-{seed}.safetensors", tiny_state_dict(arch, seed=seed))
    return folder


def pixels(paths) -> list[np.ndarray]:
    return [read_png_pixels(p) for p in paths]


def sweep_targets(models: Path, spec: dict):
    """The engine's expansion, as the CLI does it (files by name under `models`)."""
    sweep = parse_sweep(spec)
    resolver = FileResolver(models)

    def source(ref):
        recipe = parse_recipe(ref if isinstance(ref, dict) else {"merge": ref})
        return Source(recipe.name or str(ref).removesuffix(".safetensors"), recipe)

    base = source(sweep.base)
    planned = plan(base.recipe, resolver)
    planned.close()
    expanded = expand(sweep, base, lambda axis: [source(c) for c in axis.candidates], planned.architecture)
    return [Target(c.label, c.recipe, resolver, c.model_name) for c in expanded.cells], expanded


def merged_then_previewed(models: Path, tmp_path: Path, recipe, sampling: Sampling, name: str) -> list[np.ndarray]:
    """`sdmerge merge` of the variant's own recipe, then a preview of that file."""
    recipe_file = tmp_path / f"{name}.json"
    recipe_file.write_text(json.dumps(recipe.model_dump(mode="json")))
    out = tmp_path / f"{name}.safetensors"
    assert cli(["merge", str(recipe_file), "--model-root", str(models), "-o", str(out), "-q"]) == 0
    result = render_previews([Target(name, parse_recipe({"merge": str(out)}), FileResolver(tmp_path), name)],
                             sampling, tmp_path / f"{name}-png", device="cpu")
    return pixels(i.path for i in result.images)


SOUP = {"method": "uniform", "models": [f"sd1-{i}.safetensors" for i in range(5)]}


@pytest.mark.parametrize("spec", [
    {"kind": "text_encoder", "base": {"merge": SOUP}, "candidates": ["sd1-1.safetensors", "sd1-3.safetensors"]},
    {"kind": "unet", "base": {"merge": SOUP}, "candidates": ["sd1-2.safetensors", "sd1-4.safetensors"]},
    {"kind": "vae", "base": "sd1-0.safetensors", "candidates": ["sd1-3.safetensors"]},
    {"kind": "leave_one_out", "base": {"merge": SOUP}},
    {"kind": "weight", "base": {"merge": {"method": "weighted", "models": [
        {"model": "sd1-0.safetensors", "weight": 1}, "sd1-1.safetensors", "sd1-2.safetensors", "sd1-3.safetensors"]}},
     "path": "merge.models.1.weight", "values": [0, 0.5, 3]},
    {"kind": "weight", "base": {"merge": {"method": "add_difference", "a": "sd1-0.safetensors",
                                          "b": "sd1-1.safetensors", "c": "sd1-2.safetensors"}},
     "path": "merge.alpha", "start": 0, "stop": 1, "steps": 3},
], ids=["text_encoder", "unet", "vae", "leave_one_out", "weight", "alpha"])
def test_every_sweep_kind_gives_the_pixels_of_its_variant_merged_to_disk(models, tmp_path, spec):
    targets, expanded = sweep_targets(models, spec)
    sampling = Sampling(prompts=("a cat",), seeds=(2,), **SMALL)
    result = render_previews(targets, sampling, tmp_path / "sweep", device="cpu",
                             anchor=expanded.anchor)
    assert result.columns == expanded.columns and len(result.images) == len(targets)
    for i, target in enumerate(targets):
        assert np.array_equal(read_png_pixels(result.images[i].path),
                              merged_then_previewed(models, tmp_path, target.recipe, sampling, f"v{i}")[0]), target.label
    if spec["kind"] in ("leave_one_out", "weight"):
        assert all(t.recipe.output.accumulate == "fp64" for t in targets)
    if spec["kind"] == "leave_one_out":
        assert result.columns == ["all 5"] + [f"without sd1-{i}" for i in range(5)]
        assert result.derived == 3 * 6  # every variant's UNet, text encoder and VAE from the sums


def test_a_leave_one_out_variant_derived_from_the_sums_is_the_direct_sum_byte_for_byte(models):
    resolver = FileResolver(models)
    full = plan(parse_recipe({"merge": SOUP, "output": {"accumulate": "fp64"}}), resolver)
    without = plan(parse_recipe({"merge": {"method": "uniform", "models": SOUP["models"][:2] + SOUP["models"][3:]},
                                 "output": {"accumulate": "fp64"}}), resolver)
    direct, derived = (PreviewModel("sd1", torch.device("cpu"), torch.float32) for _ in range(2))
    derived.anchor = anchor = Anchor(full)
    direct.load(without)
    reads = []
    original = type(full.inputs[0].checkpoint).read_into

    def counting(self, key, start, stop, staging):
        reads.append(self.name)
        return original(self, key, start, stop, staging)

    derived.load(full)  # the sums: every model read once
    try:
        type(full.inputs[0].checkpoint).read_into = counting
        derived.load(without)
    finally:
        type(full.inputs[0].checkpoint).read_into = original
    assert set(reads) == {"sd1-2.safetensors"}  # one model read for the variant, not four
    assert anchor.derived == 6
    for component in ("unet", "text_encoder", "vae"):
        for (name, a), (_, b) in zip(direct.modules[component].module.named_parameters(),
                                     derived.modules[component].module.named_parameters(), strict=True):
            assert torch.equal(a, b), (component, name)
    full.close(), without.close()


def test_no_derivation_for_a_variant_that_accumulates_in_fp32(models):
    resolver = FileResolver(models)
    full = plan(parse_recipe({"merge": SOUP, "output": {"accumulate": "fp64"}}), resolver)
    fp32 = plan(parse_recipe({"merge": {"method": "uniform", "models": SOUP["models"][1:]}}), resolver)
    assert Anchor(full).derivation(fp32, "unet") is None
    full.close(), fp32.close()


def test_an_xy_table_has_one_column_per_x_and_rows_per_y_topic_and_prompt(models, tmp_path):
    spec = {"base": {"merge": SOUP}, "x": {"kind": "text_encoder", "candidates": ["sd1-1.safetensors", "sd1-2.safetensors"]},
            "y": {"kind": "leave_one_out"}}
    targets, expanded = sweep_targets(models, spec)
    assert len(targets) == 2 * 6 and expanded.columns == ["TE: sd1-1", "TE: sd1-2"]
    assert expanded.rows == ["all 5"] + [f"without sd1-{i}" for i in range(5)]
    topics = [Sampling(prompts=("a cat",), **SMALL), Sampling(prompts=("a dog",), seeds=(4,), steps=2, width=64, height=96)]
    result = render_previews(targets, topics, tmp_path / "xy", device="cpu", grid_rows=expanded.rows,
                             anchor=expanded.anchor)
    assert result.rows[:2] == ["all 5 · a cat  (seed 0)", "all 5 · a dog  (seed 4)"]
    assert len(result.rows) == 12
    grid = read_png_pixels(result.grid)
    assert grid.shape[0] > 6 * (64 + 96)  # rows of each topic's own height, under the header
    # the cell (x = TE sd1-2, y = without sd1-3) is that recipe
    cell = targets[4 * 2 + 1]
    assert cell.label == "TE: sd1-2" and "without sd1-3" in cell.model_name
    assert cell.recipe.components["text_encoder"] == "sd1-2.safetensors"
    assert len(cell.recipe.merge.models) == 4
    image = next(i for i in result.images if i.target_index == 9 and i.topic_index == 1)
    expected = merged_then_previewed(models, tmp_path, cell.recipe, topics[1], "cell")[0]
    assert np.array_equal(read_png_pixels(image.path), expected)


def test_sdxl_text_encoder_sweep_swaps_both_text_encoders(models):
    targets, _ = sweep_targets(models, {"kind": "text_encoder", "base": "sdxl-0.safetensors",
                                        "candidates": ["sdxl-1.safetensors"]})
    assert set(targets[0].recipe.components) == {"text_encoder", "text_encoder_2"}


@pytest.mark.parametrize("spec, message", [
    ({"kind": "leave_one_out", "base": "sd1-0.safetensors"}, "uniform or weighted merge at 'merge'"),
    ({"kind": "weight", "base": {"merge": SOUP}, "path": "merge.models.1.weight", "values": [1]}, "uniform merge"),
    ({"kind": "weight", "base": {"merge": {**SOUP, "method": "weighted"}}, "path": "merge.models.9.weight",
      "values": [1]}, "nothing at 'merge.models.9'"),
    ({"kind": "weight", "base": {"merge": SOUP}, "path": "merge.method", "values": [1]}, "not a number"),
    ({"kind": "weight", "base": {"merge": SOUP}, "path": "merge.x"}, "values, or start, stop and steps"),
    ({"kind": "unet", "base": {"merge": SOUP}}, "needs candidates"),
    ({"kind": "leave_one_out", "base": {"merge": SOUP}, "candidates": ["a"]}, "takes no candidates"),
    ({"kind": "blocks", "base": {"merge": SOUP}}, "invalid sweep at x.kind"),
    ({"kind": "unet", "candidates": ["a"]}, "needs a base"),
    ({"kind": "unet", "base": "a", "x": {"kind": "vae"}}, "not both"),
])
def test_bad_sweeps_are_refused_by_name(models, spec, message):
    with pytest.raises(OptionsError, match=message):
        sweep_targets(models, spec)


def test_a_weight_sweep_that_zeroes_every_weight_names_the_variant(models):
    spec = {"kind": "weight", "base": {"merge": {"method": "weighted", "models": [
        {"model": "sd1-0.safetensors", "weight": 0}, {"model": "sd1-1.safetensors", "weight": 1}]}},
        "path": "merge.models.1.weight", "values": [0.5, 0]}
    with pytest.raises(Exception, match="merge.models.1.weight = 0.*weights are all zero"):
        sweep_targets(models, spec)


def test_sweep_and_topics_through_the_cli(models, tmp_path, capsys):
    sweep = tmp_path / "loo.json"
    sweep.write_text(json.dumps({"kind": "leave_one_out", "base": {"name": "soup", "merge": {
        "method": "uniform", "models": ["sd1-0.safetensors", "sd1-1.safetensors", "sd1-2.safetensors"]}}}))
    topic = tmp_path / "cat.json"
    topic.write_text(json.dumps({"prompt": "a cat", "seed": 3, "steps": 3, "width": 64, "height": 64,
                                 "sampler_name": "Euler", "cfg_scale": 6,
                                 "override_settings": {"CLIP_stop_at_last_layers": 2}}))
    infotext = tmp_path / "dog.txt"
    infotext.write_text("a dog\nSteps: 2, Sampler: Euler a, CFG scale: 5, Seed: 9, Size: 64x64")
    out = tmp_path / "loo.png"
    code = cli(["preview", "--sweep", str(sweep), "--model-root", str(models), "--settings", str(topic),
                "--settings", str(infotext), "--device", "cpu", "-q", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    singles = sorted((tmp_path / "loo").iterdir())
    assert len(singles) == 4 * 2  # all 3, then without each: two topics each
    from merge_engine.preview.infotext import read_png_parameters

    first, second = (read_png_parameters(p) for p in singles[:2])
    assert first.startswith("a cat") and "Clip skip: 2" in first and "Model: soup (all 3)" in first
    assert second.startswith("a dog") and "Sampler: Euler a" in second and "Seed: 9" in second
    assert out.is_file()


def test_cli_refuses_targets_beside_a_sweep(models, tmp_path, capsys):
    sweep = tmp_path / "s.json"
    sweep.write_text(json.dumps({"kind": "vae", "base": "sd1-0.safetensors", "candidates": ["sd1-1.safetensors"]}))
    code = cli(["preview", "sd1-0.safetensors", "--sweep", str(sweep), "--model-root", str(models), "--prompt", "x",
                "-o", str(tmp_path / "o.png")])
    assert code != 0 and "not both" in capsys.readouterr().err
