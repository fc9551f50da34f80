"""Previews on the CPU with tiny models that go through the same loader and sampler as real ones:
64x64, 4 steps. Loader strictness, determinism, in-memory variants against merged files, grids,
the text encoders against torch's own attention, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merge_engine.architecture import layout
from merge_engine.cli import main as cli
from merge_engine.errors import CheckpointError, MergeCancelled, OptionsError
from merge_engine.execute import merge
from merge_engine.plan import plan
from merge_engine.preview.infotext import parse_infotext, read_png_parameters, read_png_pixels
from merge_engine.preview.models import build_component, unet_config, vae_config
from merge_engine.preview.params import Sampling
from merge_engine.preview.pipeline import PreviewModel
from merge_engine.preview.render import Target
from merge_engine.preview.render import render_previews as _render_previews
from merge_engine.preview.text_encoders import OpenClipText
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver
from merge_engine.synthetic import full_size_specs, tiny_state_dict, write_checkpoint

torch.set_num_threads(1)
pytest.importorskip("diffusers")

SMALL = dict(steps=4, width=64, height=64)
DEVICE = "cpu"  # the figures below are the CPU's (fp32); test_gpu_* run where torch sees a GPU
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("preview-models")
    for arch in ("sd1", "sd2", "sdxl"):
        for seed in (0, 1):
            write_checkpoint(folder / f"{arch}-{seed}.safetensors", tiny_state_dict(arch, seed=seed))
    write_checkpoint(folder / "sd2-te-7.safetensors", tiny_state_dict("sd2", seed=7, components=["text_encoder"]))
    return folder


def render_previews(*args, device: str = DEVICE, **kwargs):
    return _render_previews(*args, device=device, **kwargs)


def target(folder: Path, recipe: dict | str, label: str = "t") -> Target:
    return Target(label, parse_recipe({"merge": recipe} if isinstance(recipe, str) else recipe),
                  FileResolver(folder), label)


def pixels(result) -> list[np.ndarray]:
    return [read_png_pixels(image.path) for image in result.images]


# --- configs from shapes ------------------------------------------------------------------------

def _shapes(architecture: str, component: str) -> dict:
    prefix = layout(architecture).prefixes[component]
    return {k[len(prefix):]: v.shape for k, v in full_size_specs(architecture).items() if k.startswith(prefix)}


@pytest.mark.parametrize("architecture, heads, depth, linear, context", [
    ("sd1", [8, 8, 8, 8], [1, 1, 1, 1], False, 768),
    ("sd2", [5, 10, 20, 20], [1, 1, 1, 1], True, 1024),
    ("sdxl", [5, 10, 20], [1, 2, 10], True, 2048),
])
def test_published_shapes_give_the_published_unet_configs(architecture, heads, depth, linear, context):
    config = unet_config(architecture, _shapes(architecture, "unet"), pooled_width=1280)
    assert config["block_out_channels"] == ([320, 640, 1280, 1280] if architecture != "sdxl" else [320, 640, 1280])
    assert config["attention_head_dim"] == heads
    assert config["transformer_layers_per_block"] == depth
    assert config["use_linear_projection"] is linear
    assert config["cross_attention_dim"] == context
    assert config["norm_num_groups"] == 32 and config["layers_per_block"] == 2
    if architecture == "sdxl":
        assert config["addition_time_embed_dim"] == 256
        assert config["projection_class_embeddings_input_dim"] == 2816
        assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]


def test_published_vae_config():
    config = vae_config("sdxl", _shapes("sdxl", "vae"))
    assert config["block_out_channels"] == [128, 256, 512, 512]
    assert config["latent_channels"] == 4 and config["scaling_factor"] == 0.13025 and config["force_upcast"]


@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
def test_every_published_tensor_maps_to_exactly_one_parameter(architecture):
    for component in layout(architecture).prefixes:
        built = build_component(architecture, component, _shapes(architecture, component), pooled_width=1280)
        params = dict(built.module.named_parameters())
        assert set(built.sources) == set(params)
        assert len(set(built.sources.values())) == len(built.sources)


# --- text encoders ------------------------------------------------------------------------------

def test_open_clip_block_matches_torch_multihead_attention():
    torch.manual_seed(0)
    model = OpenClipText(vocab=50, positions=8, width=32, hidden=64, layers=2, projection=16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    block = model.transformer.resblocks[0]
    x = torch.randn(2, 8, 32)
    reference = torch.nn.MultiheadAttention(32, 1, batch_first=True)
    reference.in_proj_weight.data.copy_(block.attn.in_proj_weight)
    reference.in_proj_bias.data.copy_(block.attn.in_proj_bias)
    reference.out_proj.load_state_dict(block.attn.out_proj.state_dict())
    mask = torch.triu(torch.full((8, 8), float("-inf")), diagonal=1)
    expected, _ = reference(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(block.attn(x), expected, rtol=1e-5, atol=1e-5)


# --- the strict loader --------------------------------------------------------------------------

def test_strict_loader_rejects_a_missing_tensor(models, tmp_path):
    state = tiny_state_dict("sd2", seed=0)
    key = "model.diffusion_model.output_blocks.4.1.proj_out.weight"
    del state[key]
    write_checkpoint(tmp_path / "holey.safetensors", state)
    with pytest.raises(CheckpointError) as err:
        render_previews([target(tmp_path, "holey.safetensors")], Sampling(prompts=("x",), **SMALL), tmp_path / "out")
    assert err.value.key == key and err.value.component == "unet" and "missing" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_strict_loader_rejects_an_extra_tensor(tmp_path):
    state = tiny_state_dict("sd2", seed=0)
    state["first_stage_model.decoder.extra.weight"] = torch.zeros(3)
    write_checkpoint(tmp_path / "extra.safetensors", state)
    with pytest.raises(CheckpointError) as err:
        render_previews([target(tmp_path, "extra.safetensors")], Sampling(prompts=("x",), **SMALL), tmp_path / "out")
    assert err.value.key == "first_stage_model.decoder.extra.weight"


def test_a_component_only_file_cannot_be_previewed_alone(models, tmp_path):
    with pytest.raises(CheckpointError, match="full model"):
        render_previews([target(models, "sd2-te-7.safetensors")], Sampling(prompts=("x",), **SMALL), tmp_path)


def test_an_inpainting_model_is_refused_clearly(tmp_path):
    write_checkpoint(tmp_path / "inpaint.safetensors", tiny_state_dict("sd2", seed=0, variant="inpainting"))
    with pytest.raises(CheckpointError, match="inpainting UNet") as err:
        render_previews([target(tmp_path, "inpaint.safetensors")], Sampling(prompts=("x",), **SMALL), tmp_path / "o")
    assert err.value.model == "inpaint.safetensors" and not (tmp_path / "o").exists()


def test_bad_sampling_parameters_are_clear_errors(models, tmp_path):
    for bad, message in [(dict(sampler="ddim"), "unknown sampler"), (dict(width=60), "width"),
                         (dict(prompts=()), "prompt"), (dict(steps=0), "steps"), (dict(seeds=(-1,)), "seed")]:
        sampling = Sampling(**{"prompts": ("x",), **SMALL, **bad})
        with pytest.raises(OptionsError, match=message):
            render_previews([target(models, "sd2-0.safetensors")], sampling, tmp_path)


# --- sampling -----------------------------------------------------------------------------------

def test_same_seed_same_pixels_and_the_webui_infotext(models, tmp_path):
    sampling = Sampling(prompts=("a (cat:1.2) on a sofa",), negative_prompt="blurry", seeds=(7,), **SMALL)
    first = render_previews([target(models, "sd2-0.safetensors", "base")], sampling, tmp_path / "a")
    second = render_previews([target(models, "sd2-0.safetensors", "base")], sampling, tmp_path / "b")
    assert np.array_equal(pixels(first)[0], pixels(second)[0])
    assert first.grid is None
    sha = plan(parse_recipe({"merge": "sd2-0.safetensors"}), FileResolver(models)).inputs[0].sha256
    text = read_png_parameters(first.images[0].path)
    assert text == ("a (cat:1.2) on a sofa\nNegative prompt: blurry\nSteps: 4, Sampler: Euler, CFG scale: 7, "
                    f"Seed: 7, Size: 64x64, Model hash: {sha[:10]}, Model: base, RNG: CPU")
    assert parse_infotext(text)["Seed"] == "7"


def test_seeds_samplers_and_prediction_types_change_the_image(models, tmp_path):
    base = [target(models, "sd2-0.safetensors")]
    results = {}
    for name, extra in [("seed7", dict(seeds=(7,))), ("seed8", dict(seeds=(8,))),
                        ("euler_a", dict(seeds=(7,), sampler="euler_a")),
                        ("dpmpp", dict(seeds=(7,), sampler="dpmpp_2m_karras")),
                        ("epsilon", dict(seeds=(7,), prediction_type="epsilon"))]:
        results[name] = pixels(render_previews(base, Sampling(prompts=("x",), **SMALL, **extra), tmp_path / name))[0]
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(results[a], results[b]), (a, b)


def test_batches_give_the_same_images_as_single_runs(models, tmp_path):
    sampling = dict(prompts=("a cat", "a dog"), seeds=(1, 2), **SMALL)
    one = pixels(render_previews([target(models, "sd2-0.safetensors")], Sampling(**sampling, batch_size=1), tmp_path / "1"))
    four = pixels(render_previews([target(models, "sd2-0.safetensors")], Sampling(**sampling, batch_size=4), tmp_path / "4"))
    for a, b in zip(one, four, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batched matmuls may round differently


def test_topics_that_differ_only_in_prompts_share_batches(models, tmp_path, monkeypatch):
    from merge_engine.preview import render

    batches = []
    original = render._Renderer._sample

    def counted(self, model, s, prompts, seeds, negatives=None):
        batches.append(list(prompts))
        return original(self, model, s, prompts, seeds, negatives)

    monkeypatch.setattr(render._Renderer, "_sample", counted)
    long = "a cat, " * 60  # two 75-token chunks: its topic keeps batches of its own
    topics = [Sampling(prompts=("a cat",), seeds=(1,), negative_prompt="blurry", batch_size=4, **SMALL),
              Sampling(prompts=("a dog",), seeds=(2,), batch_size=4, **SMALL),
              Sampling(prompts=("a fox",), seeds=(3,), batch_size=4, cfg_scale=5.0, **SMALL),
              Sampling(prompts=(long,), seeds=(4,), batch_size=4, cfg_scale=5.0, **SMALL)]
    together = render_previews([target(models, "sd2-0.safetensors")], topics, tmp_path / "all")
    assert batches == [["a cat", "a dog"], ["a fox"], [long]]
    assert [(i.topic_index, i.seed) for i in together.images] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for n, topic in enumerate(topics):
        alone = render_previews([target(models, "sd2-0.safetensors")], topic, tmp_path / f"alone-{n}")
        assert alone.images[0].infotext == together.images[n].infotext
        difference = read_png_pixels(alone.images[0].path).astype(int) - pixels(together)[n].astype(int)
        assert np.abs(difference).max() <= 1  # batched matmuls may round differently

@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_sd1_and_sdxl_render_through_the_same_code(models, tmp_path, architecture):
    result = render_previews([target(models, f"{architecture}-0.safetensors")],
                             Sampling(prompts=("a long prompt, " * 30 + "BREAK second chunk",), **SMALL), tmp_path)
    image = pixels(result)[0]
    assert image.shape == (64, 64, 3) and image.std() > 0


# --- in-memory variants -------------------------------------------------------------------------

def test_an_in_memory_recipe_equals_the_same_recipe_merged_to_disk(models, tmp_path):
    recipe = {"name": "mix", "merge": {"method": "weighted", "models": [
        {"model": "sd2-0.safetensors", "weight": 0.3}, {"model": "sd2-1.safetensors", "weight": 0.7}]},
        "components": {"text_encoder": "sd2-te-7.safetensors"}}
    merge(plan(parse_recipe(recipe), FileResolver(models)), tmp_path / "mix.safetensors")
    sampling = Sampling(prompts=("a cat",), seeds=(3,), **SMALL)
    in_memory = render_previews([target(models, recipe, "mix")], sampling, tmp_path / "mem")
    on_disk = render_previews([target(tmp_path, "mix.safetensors", "mix")], sampling, tmp_path / "disk")
    assert np.array_equal(pixels(in_memory)[0], pixels(on_disk)[0])
    recipe_hash = plan(parse_recipe(recipe), FileResolver(models)).recipe_hash
    assert f"Model hash: {recipe_hash[:10]}" in in_memory.images[0].infotext


def test_an_in_memory_ties_recipe_equals_the_same_recipe_merged_to_disk(models, tmp_path):
    recipe = {"name": "ties-mix", "merge": {"method": "ties", "base": "sd2-0.safetensors", "k": 0.5,
                                            "models": ["sd2-1.safetensors", "sd2-te-7.safetensors"]},
              "components": {"unet": {"method": "dare", "base": "sd2-0.safetensors", "models": ["sd2-1.safetensors"],
                                      "probability": 0.5, "seed": 4}, "vae": "sd2-1.safetensors"}}
    merge(plan(parse_recipe(recipe), FileResolver(models)), tmp_path / "ties-mix.safetensors")
    sampling = Sampling(prompts=("a cat",), seeds=(3,), **SMALL)
    in_memory = render_previews([target(models, recipe, "mix")], sampling, tmp_path / "mem")
    on_disk = render_previews([target(tmp_path, "ties-mix.safetensors", "mix")], sampling, tmp_path / "disk")
    assert np.array_equal(pixels(in_memory)[0], pixels(on_disk)[0])


def test_an_in_memory_block_merge_equals_the_same_recipe_merged_to_disk(models, tmp_path):
    alpha = {"list": [i / 24 for i in range(25)], "base": 0.25, "overrides": [{"keys": "*attn2*", "value": 1.0}]}
    recipe = {"name": "mbw", "merge": {"method": "weighted_sum", "a": "sd2-0.safetensors",
                                       "b": "sd2-1.safetensors", "alpha": alpha}}
    merge(plan(parse_recipe(recipe), FileResolver(models)), tmp_path / "mbw.safetensors")
    sampling = Sampling(prompts=("a cat",), seeds=(3,), **SMALL)
    in_memory = render_previews([target(models, recipe, "mbw")], sampling, tmp_path / "mem")
    on_disk = render_previews([target(tmp_path, "mbw.safetensors", "mbw")], sampling, tmp_path / "disk")
    assert np.array_equal(pixels(in_memory)[0], pixels(on_disk)[0])


def test_an_in_memory_lora_bake_equals_the_baked_file(models, tmp_path):
    from test_lora import KOHYA_SD2, write_lora

    lora = tmp_path / "lora" / "style.safetensors"
    lora.parent.mkdir()
    write_lora(lora, load_file(models / "sd2-0.safetensors"), KOHYA_SD2, seed=3)
    recipe = {"name": "baked", "merge": {"method": "lora", "model": "sd2-0.safetensors",
                                         "loras": [{"lora": str(lora), "strength": 0.7}]}}
    merge(plan(parse_recipe(recipe), FileResolver(models)), tmp_path / "baked.safetensors")
    sampling = Sampling(prompts=("a cat",), seeds=(3,), **SMALL)
    mem = Target("baked", parse_recipe(recipe), FileResolver(models), "baked")
    in_memory = render_previews([mem], sampling, tmp_path / "mem")
    on_disk = render_previews([target(tmp_path, "baked.safetensors", "baked")], sampling, tmp_path / "disk")
    plain = render_previews([target(models, "sd2-0.safetensors", "plain")], sampling, tmp_path / "plain")
    assert np.array_equal(pixels(in_memory)[0], pixels(on_disk)[0])
    assert not np.array_equal(pixels(in_memory)[0], pixels(plain)[0])


def test_a_text_encoder_swap_rewrites_only_the_text_encoder(models):
    resolver = FileResolver(models)
    base = plan(parse_recipe({"merge": "sd2-0.safetensors"}), resolver)
    swapped = plan(parse_recipe({"merge": "sd2-0.safetensors", "components": {"text_encoder": "sd2-te-7.safetensors"}}),
                   resolver)
    model = PreviewModel("sd2", torch.device("cpu"), torch.float32)
    assert model.load(base, exact_copy=True) == ["unet", "text_encoder", "vae"]
    unet_weight = next(model.modules["unet"].module.parameters())
    before = unet_weight.data_ptr()
    assert model.load(swapped) == ["text_encoder"]
    assert model.load(swapped) == []
    assert model.load(base, exact_copy=True) == ["text_encoder"]
    assert next(model.modules["unet"].module.parameters()).data_ptr() == before  # in place
    te = model.modules["text_encoder"].module.token_embedding.weight
    assert torch.equal(te, base.inputs[0].checkpoint.read_tensor("cond_stage_model.model.token_embedding.weight").float())


def test_grid_layout_and_headers(models, tmp_path):
    sampling = Sampling(prompts=("a cat", "a dog"), seeds=(1, 2), **SMALL)
    targets = [target(models, "sd2-0.safetensors", "base"),
               target(models, {"merge": "sd2-0.safetensors", "components": {"text_encoder": "sd2-te-7.safetensors"}},
                      "TE: sd2-te-7")]
    result = render_previews(targets, sampling, tmp_path)
    assert result.columns == ["base", "TE: sd2-te-7"]
    assert result.rows == ["a cat  (seed 1)", "a cat  (seed 2)", "a dog  (seed 1)", "a dog  (seed 2)"]
    assert [(i.target_index, i.prompt_index, i.seed) for i in result.images] == [
        (t, p, s) for t in (0, 1) for p in (0, 1) for s in (1, 2)]
    grid = read_png_pixels(result.grid)
    header = grid.shape[0] - 4 * 64
    label_width = grid.shape[1] - 2 * 64
    assert header > 0 and label_width >= 160
    for image in result.images:  # each image sits in its cell, pixel for pixel
        row = image.prompt_index * 2 + (image.seed - 1)
        cell = grid[header + row * 64: header + (row + 1) * 64,
                    label_width + image.target_index * 64: label_width + (image.target_index + 1) * 64]
        assert np.array_equal(cell, read_png_pixels(image.path))
    assert grid[:header, label_width:].min() < 128  # the column headers are drawn
    assert grid[header:, :label_width].min() < 128  # and the row headers


@CUDA
def test_gpu_preview_is_deterministic_and_equals_the_merged_file(models, tmp_path):
    recipe = {"name": "mix", "merge": {"method": "uniform", "models": ["sd2-0.safetensors", "sd2-1.safetensors"]}}
    merge(plan(parse_recipe(recipe), FileResolver(models)), tmp_path / "mix.safetensors")
    sampling = Sampling(prompts=("a cat", "a (dog:1.3)"), seeds=(3,), **SMALL)
    first = render_previews([target(models, recipe, "mix")], sampling, tmp_path / "a", device="cuda")
    again = render_previews([target(models, recipe, "mix")], sampling, tmp_path / "b", device="cuda")
    on_disk = render_previews([target(tmp_path, "mix.safetensors", "mix")], sampling, tmp_path / "c", device="cuda")
    for a, b, c in zip(pixels(first), pixels(again), pixels(on_disk), strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    on_cpu = pixels(render_previews([target(models, recipe, "mix")], sampling, tmp_path / "d"))
    for gpu, cpu in zip(pixels(first), on_cpu, strict=True):  # fp16 on the GPU against fp32
        assert np.abs(gpu.astype(int) - cpu.astype(int)).mean() < 8


def test_cancel_stops_before_sampling(models, tmp_path):
    with pytest.raises(MergeCancelled):
        render_previews([target(models, "sd2-0.safetensors")], Sampling(prompts=("x",), **SMALL), tmp_path / "c",
                        should_cancel=lambda: True)


# --- grids and the CLI --------------------------------------------------------------------------

def test_text_encoder_sweep_grid_through_the_cli(models, tmp_path, capsys):
    out = tmp_path / "sweep.png"
    code = cli(["preview", str(models / "sd2-0.safetensors"), "--swap-text-encoder-from",
                str(models / "sd2-1.safetensors"), str(models / "sd2-te-7.safetensors"),
                "--prompt", "a cat", "--prompt", "a dog", "--seed", "5", "--steps", "4", "--width", "64",
                "--height", "64", "--device", "cpu", "-q", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    singles = sorted((tmp_path / "sweep").iterdir())
    assert [p.name for p in singles] == [f"{n:03d}.png" for n in range(6)]  # 3 targets x 2 prompts
    models_named = [parse_infotext(read_png_parameters(p))["Model"] for p in singles]
    assert models_named == ["sd2-0", "sd2-0", "sd2-0 + TE sd2-1", "sd2-0 + TE sd2-1",
                            "sd2-0 + TE sd2-te-7", "sd2-0 + TE sd2-te-7"]
    grid = read_png_pixels(out)
    height, width = grid.shape[:2]
    assert width > 3 * 64 and (width - 3 * 64) >= 160  # three image columns and a label column
    assert height > 2 * 64  # two rows below a header
    assert read_png_parameters(out) is not None
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_cli_single_image_and_clear_errors(models, tmp_path, capsys):
    out = tmp_path / "one.png"
    args = ["preview", str(models / "sd2-0.safetensors"), "--prompt", "x", "--steps", "4",
            "--width", "64", "--height", "64", "--device", "cpu", "-q", "-o", str(out)]
    assert cli(args) == 0
    assert read_png_pixels(out).shape == (64, 64, 3)
    assert cli(args) == 2 and "already exists" in capsys.readouterr().err
    assert cli(["preview", str(tmp_path / "nope.safetensors"), "--prompt", "x", "-o", str(tmp_path / "n.png")]) == 2
    assert "no such model file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"merge": {"method": "uniform", "models": []}}))
    assert cli(["preview", str(bad), "--prompt", "x", "-o", str(tmp_path / "b.png")]) == 2
    assert capsys.readouterr().err.startswith("sdmerge: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "one.png"]
