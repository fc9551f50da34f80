"""Synthetic checkpoints: real key names, consistent tiny shapes, real files."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge_engine.architecture import layout
from merge_engine.synthetic import (
    TINY_CONFIGS,
    full_size_specs,
    tiny_specs,
    tiny_state_dict,
    write_checkpoint,
    write_random,
)

torch.set_num_threads(1)

UNET = "model.diffusion_model."


@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
def test_tiny_keys_are_the_layout_keys(architecture):
    state = tiny_state_dict(architecture, extras=False)
    assert list(state) == list(layout(architecture).weights)
    assert set(tiny_specs(architecture)) == set(layout(architecture).weights)


def test_sd2_counts():
    lay = layout("sd2")
    assert [len(lay.component_weights(c)) for c in ("unet", "text_encoder", "vae")] == [686, 294, 248]


@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
def test_tiny_shapes_follow_the_config(architecture):
    config = TINY_CONFIGS[architecture]
    specs = tiny_specs(architecture)
    unet, vae = config["unet"], config["vae"]
    assert specs[UNET + "input_blocks.0.0.weight"].shape == (unet["model_channels"], 4, 3, 3)
    assert specs[UNET + "time_embed.0.weight"].shape == (unet["time_embed_dim"], unet["model_channels"])
    assert specs["first_stage_model.encoder.conv_in.weight"].shape == (vae["block_out_channels"][0], 3, 3, 3)
    assert specs["first_stage_model.encoder.conv_out.weight"].shape[:2] == (2 * vae["latent_channels"],
                                                                             vae["block_out_channels"][-1])
    groups = unet["norm_num_groups"]
    for key, spec in specs.items():  # GroupNorm-32 everywhere in the UNet and the VAE
        if key.startswith((UNET, "first_stage_model.")) and key.endswith(".weight") and len(spec.shape) == 1:
            assert spec.shape[0] % groups == 0, key
    widths = {spec.shape[1] for key, spec in specs.items() if key.endswith("attn2.to_k.weight")}
    assert widths == {unet["cross_attention_dim"]}
    text = [c for c in ("text_encoder", "text_encoder_2") if c in config]
    assert sum(config[c]["hidden_size"] for c in text) == unet["cross_attention_dim"]
    for component in text:
        prefix = layout(architecture).prefixes[component]
        token = [s for k, s in specs.items() if k.startswith(prefix) and k.endswith("token_embedding.weight")]
        assert token[0].shape == (49408, config[component]["hidden_size"])
    if architecture == "sdxl":
        pooled = config["text_encoder_2"]["projection_dim"] + 6 * unet["addition_time_embed_dim"]
        assert specs[UNET + "label_emb.0.0.weight"].shape == (unet["model_channels"] * 4, pooled)
        assert unet["adm_in_channels"] == pooled


@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
def test_tiny_is_small(architecture):
    full = sum(math.prod(s.shape) for s in full_size_specs(architecture).values())
    tiny = sum(math.prod(s.shape) for s in tiny_specs(architecture).values())
    assert tiny * 40 < full


def test_values_are_deterministic_and_plausible():
    a = tiny_state_dict("sd1", seed=3)
    b = tiny_state_dict("sd1", seed=3)
    c = tiny_state_dict("sd1", seed=4)
    key = UNET + "middle_block.1.proj_in.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    assert a[key].dtype == torch.float16
    assert 0.015 < a[UNET + "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight"].float().std() < 0.025
    assert abs(a[UNET + "out.0.weight"].float().mean() - 1) < 0.02
    ids = a["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])
    unet_only = tiny_state_dict("sd1", seed=3, components=["unet"])
    assert all(torch.equal(unet_only[k], a[k]) for k in unet_only if k.startswith(UNET))


def test_schedule_buffers_are_the_ddpm_linear_schedule():
    state = tiny_state_dict("sd2", components=["vae"])
    betas, cumprod = state["betas"], state["alphas_cumprod"]
    assert betas.dtype == torch.float32 and betas.shape == (1000,)
    assert math.isclose(betas[0].item(), 0.00085, rel_tol=1e-5)
    assert math.isclose(betas[-1].item(), 0.012, rel_tol=1e-5)
    assert torch.allclose(cumprod, torch.cumprod(1 - betas.double(), 0).float())
    assert torch.allclose(state["sqrt_alphas_cumprod"] ** 2, cumprod)
    assert math.isclose(state["alphas_cumprod_prev"][0].item(), 1.0)
    assert set(layout("sd2").extra) - set(state) == {"model_ema.decay", "model_ema.num_updates", "logvar"}
    assert "betas" not in tiny_state_dict("sdxl", components=["vae"])


def test_options():
    inpaint = tiny_state_dict("sd2", variant="inpainting", dtype=torch.float32, components=["unet"])
    assert inpaint[UNET + "input_blocks.0.0.weight"].shape[1] == 9
    assert inpaint[UNET + "out.2.weight"].dtype == torch.float32
    bare = tiny_state_dict("sd2", components=["vae"], prefix_vae=False, extras=False)
    assert "decoder.conv_out.weight" in bare and len(bare) == 248
    with pytest.raises(ValueError):
        tiny_state_dict("sd2", components=["text_encoder_2"])
    with pytest.raises(ValueError):
        tiny_state_dict("sd2", variant="upscaler")


def test_write_checkpoint_round_trip(tmp_path):
    state = tiny_state_dict("sd1", seed=5)
    path = write_checkpoint(tmp_path / "tiny.safetensors", state, {"note": "x"})
    loaded = load_file(str(path))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"note": "x"}


def test_full_size_byte_counts():
    def nbytes(arch):
        return sum(math.prod(s.shape) * (8 if s.dtype == "I64" else 2) for s in full_size_specs(arch).values())
    assert nbytes("sd1") == 2_132_471_230
    assert nbytes("sd2") == 2_607_194_456
    assert nbytes("sdxl") == 6_937_676_352


def test_write_random_streams_a_valid_file(tmp_path):
    specs = tiny_specs("sd1")
    path = write_random(tmp_path / "random.safetensors", specs, seed=2, metadata={"a": "b"})
    assert not list(tmp_path.glob("*.partial"))
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    offsets = sorted(v["data_offsets"] for k, v in json.loads(raw[8:8 + length]).items() if k != "__metadata__")
    assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    assert offsets[-1][1] == len(raw) - 8 - length
    loaded = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in loaded.items()} == {k: s.shape for k, s in specs.items()}
    ids = loaded["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert torch.equal(ids, torch.arange(77)[None])
    assert 0.015 < loaded[UNET + "middle_block.0.in_layers.2.weight"].float().std() < 0.025
    assert abs(loaded[UNET + "out.0.weight"].float().mean() - 1) < 0.02
    again = load_file(str(write_random(tmp_path / "again.safetensors", specs, seed=2)))
    assert torch.equal(again[UNET + "out.2.weight"], loaded[UNET + "out.2.weight"])
