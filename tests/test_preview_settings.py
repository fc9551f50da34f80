"""The WebUI's preview settings against their published definitions, on hand-computed tensors:
the float32 schedule from alphas_cumprod, the samplers, clip skip, hires fix, FreeU (sd-webui-freeu)
and dynamic thresholding (sd-dynamic-thresholding); the infotext in the WebUI's order and its round
trip; A1111 txt2img payloads and infotexts imported, what cannot be honoured refused by name;
and every setting end to end on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from merge_engine.errors import OptionsError
from merge_engine.preview import effects
from merge_engine.preview.a1111_settings import (
    from_infotext,
    from_txt2img_payload,
    infotext_parameters,
)
from merge_engine.preview.effects import (
    FreeUState,
    dynamic_threshold,
    filter_skip,
    free_u,
    ratio_to_region,
)
from merge_engine.preview.infotext import format_parameters, read_png_parameters, read_png_pixels
from merge_engine.preview.params import DynamicThresholding, FreeU, FreeUStage, Hires, Sampling
from merge_engine.preview.pipeline import clip_layer
from merge_engine.preview.render import DecodeVae, Target
from merge_engine.preview.render import render_previews as _render
from merge_engine.preview.sampling import Schedule, sample
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver
from merge_engine.synthetic import tiny_state_dict, write_checkpoint

torch.set_num_threads(1)
pytest.importorskip("diffusers")
SMALL = dict(steps=4, width=64, height=64)

AUTHOR = ("1girl, solo\nNegative prompt: lowres\nSteps: 256, Sampler: Euler, CFG scale: 6, Seed: 2, Size: 1024x576, "
          "Model hash: 0123456789, Model: mix, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, "
          "Denoising strength: 0.7, Clip skip: 2, RNG: CPU, "
          'FreeU Stages: "[{\\"backbone_factor\\": 1.1, \\"skip_factor\\": 0.9}, {\\"backbone_factor\\": 1.2, '
          '\\"skip_factor\\": 0.2}]", FreeU Schedule: "0.0, 1.0, 0.0", FreeU Version: 2, '
          "Hires upscale: 1.5, Hires steps: 64, Hires upscaler: Latent, Dynamic thresholding enabled: True, "
          "Mimic scale: 1, Separate Feature Channels: True, Scaling Startpoint: MEAN, Variability Measure: AD, "
          "Interpolate Phi: 0.3, Threshold percentile: 100")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("settings-models")
    for arch, seed in (("sd1", 0), ("sd2", 0), ("sd2", 1)):
        write_checkpoint(folder / f"{arch}-{seed}.safetensors", tiny_state_dict(arch, seed=seed))
    vae = {k: v for k, v in tiny_state_dict("sd2", seed=5).items() if k.startswith("first_stage_model.")}
    write_checkpoint(folder / "other-vae.safetensors", vae)
    return folder


def render(folder: Path, name: str, sampling: Sampling, out: Path, **kwargs):
    target = Target("t", parse_recipe({"merge": name}), FileResolver(folder), "t")
    return _render([target], sampling, out, device="cpu", **kwargs)


def image(result) -> np.ndarray:
    return read_png_pixels(result.images[0].path)


# -- the schedule and the samplers -----------------------------------------------------------------

def test_the_default_schedule_is_ldms_float64_cumprod_stored_as_float32():
    # ldm's make_beta_schedule("linear"): torch.linspace in float64, squared; cumprod in numpy
    betas = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2).numpy()
    alphas_cumprod = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)
    schedule = Schedule.ldm(0.00085, 0.012, 1000)
    assert torch.equal(schedule.sigmas, ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)  # k-diffusion, in float32
    assert schedule.sigmas.dtype == torch.float32
    independent = np.sqrt((1 - np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2))
                          / np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2))
    # alphas_cumprod stored in float32 moves the smallest sigmas by up to 1e-5 (1 - a cancels)
    assert np.allclose(schedule.sigmas.numpy(), independent, rtol=2e-5)
    assert schedule.sigma_min == pytest.approx(0.0291675, rel=1e-5) and schedule.sigma_max == pytest.approx(14.614642)


def test_get_sigmas_and_karras_are_k_diffusions():
    schedule = Schedule.ldm(0.00085, 0.012, 1000)
    sigmas = schedule.get_sigmas(5)
    assert sigmas.dtype == torch.float32 and len(sigmas) == 6 and sigmas[-1] == 0
    t = torch.linspace(999, 0, 5)  # float32, then log-sigma interpolation between integer steps
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    expected = ((1 - w) * schedule.log_sigmas[low] + w * schedule.log_sigmas[high]).exp()
    assert torch.equal(sigmas[:-1], expected)
    karras = schedule.karras(4)
    lo, hi = schedule.sigma_min ** (1 / 7), schedule.sigma_max ** (1 / 7)
    assert torch.equal(karras[:-1], (hi + torch.linspace(0, 1, 4) * (lo - hi)) ** 7)
    # a sigma's timestep is the inverse of the interpolation
    assert torch.allclose(schedule.sigma_to_t(expected), t, atol=1e-3)


def test_euler_and_euler_a_steps_by_hand():
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    x = torch.ones(1, 1, 1, 1) * 2.0
    half = lambda x, sigma: x * 0.5  # noqa: E731 - a denoiser whose answer is known
    # Euler: d = (x - x/2) / sigma; x += d * (next - sigma)
    x1 = 2.0 + (2.0 - 1.0) / 2.0 * (1.0 - 2.0)
    x2 = x1 + (x1 - x1 / 2) / 1.0 * (0.0 - 1.0)
    assert sample("euler", half, x, sigmas, lambda: None).item() == pytest.approx(x2)
    draws = iter([torch.full((1, 1, 1, 1), 0.25)])
    up = min(1.0, math.sqrt(1.0 * (4.0 - 1.0) / 4.0))
    down = math.sqrt(1.0 - up**2)
    y1 = 2.0 + (2.0 - 1.0) / 2.0 * (down - 2.0) + 0.25 * up
    y2 = y1 + (y1 - y1 / 2) / 1.0 * (0.0 - 1.0)
    assert sample("euler_a", half, x, sigmas, lambda: next(draws)).item() == pytest.approx(y2, rel=1e-6)


def test_the_checkpoints_own_alphas_cumprod_is_used(models, tmp_path):
    state = tiny_state_dict("sd2", seed=0)
    state["alphas_cumprod"] = (state["alphas_cumprod"].double() ** 1.5).float()  # another schedule
    write_checkpoint(models / "sd2-schedule.safetensors", state)
    sampling = Sampling(prompts=("x",), **SMALL)
    assert not np.array_equal(image(render(models, "sd2-0.safetensors", sampling, tmp_path / "a")),
                              image(render(models, "sd2-schedule.safetensors", sampling, tmp_path / "b")))


# -- clip skip -----------------------------------------------------------------------------------

def test_clip_skip_has_the_webuis_meaning():
    sd1 = {"layer": -1, "final_norm": True}
    assert clip_layer("sd1", sd1, 1) == (-1, True)
    assert clip_layer("sd1", sd1, 2) == (-2, True)  # hidden_states[-2], then final_layer_norm
    assert clip_layer("sd1", sd1, 3) == (-3, True)
    sd2 = {"layer": -2, "final_norm": True}
    assert clip_layer("sd2", sd2, 2) == (-2, True)  # the WebUI ignores it for OpenCLIP
    sdxl = {"layer": -2, "final_norm": False}
    assert clip_layer("sdxl", sdxl, 2) == (-2, False)  # and for SDXL unless sdxl_clip_l_skip is on


def test_clip_skip_changes_sd1_and_not_sd2(models, tmp_path):
    for name, changes in (("sd1-0.safetensors", True), ("sd2-0.safetensors", False)):
        one = image(render(models, name, Sampling(prompts=("a cat",), **SMALL), tmp_path / f"{name}1"))
        two = image(render(models, name, Sampling(prompts=("a cat",), clip_skip=2, **SMALL), tmp_path / f"{name}2"))
        assert (not np.array_equal(one, two)) == changes, name


# -- hires fix -----------------------------------------------------------------------------------

def test_hires_sizes_and_steps_are_the_webuis():
    assert Hires(scale=1.5).target_size(1024, 576) == (1536, 864, 0, 0)
    assert Hires(resize_x=1920, resize_y=0).target_size(1024, 576) == (1920, 1080, 0, 0)
    # another aspect: upscale to cover, then crop (truncate in latent pixels)
    assert Hires(resize_x=1024, resize_y=1024).target_size(1024, 576) == (1820, 1024, 99, 0)
    assert Hires(second_pass_steps=64, denoising_strength=0.7).steps(256) == (91, 63)
    assert Hires(denoising_strength=1.0).steps(20) == (20, 19)  # min(strength, 0.999)


def test_hires_fix_end_to_end(models, tmp_path):
    base = dict(prompts=("a cat",), seeds=(3,), steps=4, width=64, height=64)
    hires = Hires(upscaler="Latent", scale=1.5, second_pass_steps=3, denoising_strength=0.7)
    first = render(models, "sd2-0.safetensors", Sampling(**base, hires=hires), tmp_path / "a")
    again = render(models, "sd2-0.safetensors", Sampling(**base, hires=hires), tmp_path / "b")
    assert image(first).shape == (96, 96, 3) and np.array_equal(image(first), image(again))
    for upscaler in ("Latent (nearest-exact)", "Lanczos", "Nearest"):
        other = render(models, "sd2-0.safetensors",
                       Sampling(**base, hires=Hires(upscaler=upscaler, scale=1.5, second_pass_steps=3)),
                       tmp_path / upscaler)
        assert image(other).shape == (96, 96, 3) and not np.array_equal(image(other), image(first)), upscaler
    text = read_png_parameters(first.images[0].path)
    assert "Denoising strength: 0.7, RNG: CPU, Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent" in text


def test_a_lanczos_upscale_is_pils_in_the_webuis_steps():
    from PIL import Image

    image_in = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    out = effects.upscale_image(image_in, 45, 30, "Lanczos")
    # Upscaler.upscale: resize by the scale, then to a multiple of 8, then to the target
    step = image_in.resize((45, 30), resample=Image.Resampling.LANCZOS).resize((40, 24), resample=Image.Resampling.LANCZOS)
    assert np.array_equal(np.array(out), np.array(step.resize((45, 30), resample=Image.Resampling.LANCZOS)))


# -- FreeU ---------------------------------------------------------------------------------------

def test_freeu_v1_and_v2_backbone_scaling_by_hand():
    h = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2)
    skip = torch.zeros(2, 4, 2, 2)
    stage = FreeUStage(backbone_factor=1.5)
    state = FreeUState(FreeU(stages=(stage, FreeUStage(), FreeUStage()), version="1"), (4, 2, 1))
    out, _ = free_u(h.clone(), skip, state)
    # ratio_to_region(0.5, 0, 4) = channels 0..2 inclusive, as the extension's mask is
    assert ratio_to_region(0.5, 0.0, 4) == (0, 2, False)
    assert torch.equal(out[:, :3], h[:, :3] * 1.5) and torch.equal(out[:, 3:], h[:, 3:])
    state = FreeUState(FreeU(stages=(stage, FreeUStage(), FreeUStage()), version="2"), (4, 2, 1))
    out, _ = free_u(h.clone(), skip, state)
    mean = h.mean(1, keepdim=True)
    low = mean.flatten(1).min(1).values.view(2, 1, 1, 1)
    high = mean.flatten(1).max(1).values.view(2, 1, 1, 1)
    scale = 1 + 0.5 * (mean - low) / (high - low)
    assert torch.allclose(out[:, :3], h[:, :3] * scale) and torch.equal(out[:, 3:], h[:, 3:])


def test_freeu_skip_filter_scales_the_lowest_frequencies():
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    out = filter_skip(x, threshold=0.0, scale=0.5, scale_high=1.0)
    freq = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(1, 2, 8, 8)
    mask[..., 3:5, 3:5] = 0.5  # the 2x2 block at the centre (threshold rows/cols = max(1, 0))
    expected = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(filter_skip(x, 0.0, 1.0, 1.0), x)


def test_freeu_schedule_is_the_extensions():
    state = FreeUState(FreeU(start_ratio=0.25, stop_ratio=0.75))
    state.sampling_steps = 8
    ratios = []
    for step in range(10):
        state.current_step = step
        ratios.append(state.schedule_ratio())
    assert ratios == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]  # start int(2), stop int(6); the count goes on past


def test_freeu_of_ones_is_no_freeu_and_otherwise_changes_the_image(models, tmp_path):
    base = dict(prompts=("a cat",), seeds=(1,), **SMALL)
    plain = image(render(models, "sd2-0.safetensors", Sampling(**base), tmp_path / "plain"))
    ones = image(render(models, "sd2-0.safetensors", Sampling(**base, freeu=FreeU()), tmp_path / "ones"))
    assert np.array_equal(plain, ones)
    stages = (FreeUStage(1.1, 0.9), FreeUStage(1.2, 0.2), FreeUStage())
    for version in ("1", "2"):
        freeu = image(render(models, "sd2-0.safetensors", Sampling(**base, freeu=FreeU(stages=stages, version=version)),
                             tmp_path / version))
        assert not np.array_equal(plain, freeu), version


# -- dynamic thresholding --------------------------------------------------------------------------

def test_dynamic_thresholding_by_hand():
    uncond = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    cond = torch.tensor([[[[1.0, 1.0], [2.0, 5.0]]]])
    settings = DynamicThresholding(mimic_scale=2.0, threshold_percentile=100.0)
    out = dynamic_threshold(cond, uncond, 8.0, settings, step=0, max_steps=10)
    # MEAN, AD, separate channels: centre both targets, clamp the CFG one to the larger
    # max-abs deviation, rescale it to the mimic one's, add the CFG mean back
    mim = uncond + (cond - uncond) * 2.0
    cfg = uncond + (cond - uncond) * 8.0
    mim_c, cfg_c = mim - mim.mean(), cfg - cfg.mean()
    top = max(mim_c.abs().max(), cfg_c.abs().max())
    expected = cfg_c.clamp(-top, top) / top * mim_c.abs().max() + cfg.mean()
    assert torch.allclose(out, expected)
    # interpolate phi blends with the plain CFG result
    half = dynamic_threshold(cond, uncond, 8.0, DynamicThresholding(mimic_scale=2.0, interpolate_phi=0.3), 0, 10)
    assert torch.allclose(half, expected * 0.3 + cfg * 0.7)
    # mimic = cfg at the 100th percentile changes nothing
    same = dynamic_threshold(cond, uncond, 8.0, DynamicThresholding(mimic_scale=8.0), 0, 10)
    assert torch.allclose(same, cfg)
    zero = dynamic_threshold(cond, uncond, 8.0, DynamicThresholding(mimic_scale=2.0, scaling_startpoint="ZERO",
                                                                    variability_measure="STD"), 0, 10)
    assert torch.allclose(zero, cfg * (mim_c.std() / cfg_c.std()))


def test_dynamic_thresholding_schedules_and_end_to_end(models, tmp_path):
    assert effects.interpret_scale(7.0, "Linear Down", 1.0, step=5, max_steps=11, sched_val=4) == pytest.approx(4.0)
    assert effects.interpret_scale(7.0, "Power Up", 0.0, step=10, max_steps=11, sched_val=2) == pytest.approx(7.0)
    base = dict(prompts=("a cat",), seeds=(1,), cfg_scale=12, **SMALL)
    plain = image(render(models, "sd2-0.safetensors", Sampling(**base), tmp_path / "plain"))
    fixed = render(models, "sd2-0.safetensors",
                   Sampling(**base, dynamic_thresholding=DynamicThresholding(mimic_scale=1, interpolate_phi=0.3)),
                   tmp_path / "dt")
    assert not np.array_equal(plain, image(fixed))
    assert "Dynamic thresholding enabled: True, Mimic scale: 1," in read_png_parameters(fixed.images[0].path)


# -- decoding with another VAE ---------------------------------------------------------------------

def test_a_vae_from_another_file_decodes_and_is_named(models, tmp_path):
    sampling = Sampling(prompts=("a cat",), seeds=(1,), **SMALL)
    own = render(models, "sd2-0.safetensors", sampling, tmp_path / "own")
    other = render(models, "sd2-0.safetensors", sampling, tmp_path / "other",
                   vae=DecodeVae("other-vae.safetensors", "other-vae.safetensors"))
    assert not np.array_equal(image(own), image(other))
    # the same as a checkpoint with that VAE baked in
    from merge_engine.execute import merge
    from merge_engine.plan import plan

    baked = plan(parse_recipe({"merge": "sd2-0.safetensors", "components": {"vae": "other-vae.safetensors"},
                               "output": {"dtype": "fp32"}}), FileResolver(models))
    merge(baked, models / "baked.safetensors", overwrite=True)
    baked.close()
    assert np.array_equal(image(other), image(render(models, "baked.safetensors", sampling, tmp_path / "baked")))
    text = read_png_parameters(other.images[0].path)
    from merge_engine.hashing import hash_file

    sha = hash_file(models / "other-vae.safetensors").sha256
    assert f"Model: t, VAE hash: {sha[:10]}, VAE: other-vae.safetensors, RNG: CPU" in text


# -- infotext and A1111 settings -------------------------------------------------------------------

def test_the_authors_infotext_imports_and_writes_back_the_same():
    sampling, vae = from_infotext(AUTHOR)
    assert vae == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert (sampling.steps, sampling.sampler, sampling.cfg_scale, sampling.seeds) == (256, "euler", 6.0, (2,))
    assert (sampling.width, sampling.height, sampling.clip_skip) == (1024, 576, 2)
    assert sampling.hires == Hires("Latent", 1.5, 0, 0, 64, 0.7)
    assert sampling.freeu.version == "2" and sampling.freeu.stages[1] == FreeUStage(1.2, 0.2)
    assert sampling.dynamic_thresholding == DynamicThresholding(mimic_scale=1, interpolate_phi=0.3)
    written = format_parameters("1girl, solo", "lowres", infotext_parameters(
        sampling, 2, "0123456789", "mix", ("735e4c3a44", "vae-ft-mse-840000-ema-pruned.safetensors")))
    assert written == AUTHOR


@pytest.mark.parametrize("sampling", [
    Sampling(prompts=("a, b: c",), negative_prompt="n", seeds=(5,), steps=1000, sampler="dpmpp_2m_karras",
             width=1024, height=576),
    Sampling(prompts=("p",), seeds=(0,), sampler="euler_a", clip_skip=3,
             hires=Hires("Lanczos", 2.0, 1920, 1080, 0, 0.5),
             freeu=FreeU(stages=(FreeUStage(1.3, 0.8, 0.1, 0.4, 0.2, 1.1), FreeUStage(), FreeUStage(0.9)),
                         start_ratio=0.1, stop_ratio=0.9, transition_smoothness=0.5, version="1"),
             dynamic_thresholding=DynamicThresholding(4.5, 99.5, "Power Up", 1.0, "Cosine Down", 2.0, 3.0, False,
                                                      "ZERO", "STD", 0.8)),
])
def test_every_setting_round_trips_through_the_infotext(sampling):
    text = format_parameters(sampling.prompts[0], sampling.negative_prompt,
                             infotext_parameters(sampling, sampling.seeds[0], "abc", "m"))
    back, _ = from_infotext(text)
    assert back.to_dict() | {"batch_size": 4} == sampling.to_dict() | {"batch_size": 4}


def test_a_txt2img_payload_with_the_extensions():
    body = {"prompt": "1girl", "negative_prompt": "lowres", "seed": 2, "steps": 48, "cfg_scale": 6,
            "sampler_name": "Euler", "width": 1024, "height": 576, "batch_size": 2, "n_iter": 2,
            "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 16,
            "denoising_strength": 0.7, "restore_faces": False, "send_images": True,
            "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "vae-ft-mse-840000-ema-pruned.safetensors",
                                  "randn_source": "CPU"},
            "alwayson_scripts": {
                "Dynamic Thresholding (CFG Scale Fix)": {"args": [True, 1, 100, "Constant", 0, "Constant", 0, 4, True,
                                                                  "MEAN", "AD", 0.3]},
                "FreeU": {"args": [True, 0.0, 1.0, 0.0, "2", 1.1, 0.9, 0, 0.5, 0, 1, 1.2, 0.2, 0, 0.5, 0, 1]}}}
    sampling, vae = from_txt2img_payload(body)
    assert vae == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert sampling.seeds == (2, 3, 4, 5) and sampling.batch_size == 2 and sampling.clip_skip == 2
    assert sampling.hires == Hires("Latent", 1.5, 0, 0, 16, 0.7)
    assert sampling.dynamic_thresholding == DynamicThresholding(mimic_scale=1, interpolate_phi=0.3)
    assert sampling.freeu.stages[:2] == (FreeUStage(1.1, 0.9), FreeUStage(1.2, 0.2)) and sampling.freeu.version == "2"


def test_what_cannot_be_honoured_is_named():
    body = {"prompt": "x", "seed": -1, "sampler_name": "Heun", "restore_faces": True, "tiling": True,
            "override_settings": {"sd_model_checkpoint": "other.safetensors", "randn_source": "GPU"},
            "alwayson_scripts": {"ADetailer": {"args": []}}, "frobnicate": 1}
    with pytest.raises(OptionsError) as caught:
        from_txt2img_payload(body)
    refused = " ".join(caught.value.details["refused"])
    for field in ("seed=-1", "Heun", "restore_faces", "tiling", "sd_model_checkpoint", "randn_source",
                  "ADetailer", "frobnicate"):
        assert field in refused, field
    with pytest.raises(OptionsError, match="Face restoration"):
        from_infotext("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Face restoration: CodeFormer")
    with pytest.raises(OptionsError, match="RNG"):
        from_infotext("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, RNG: GPU")


def test_steps_and_sizes_the_webui_allows():
    Sampling(prompts=("x",), steps=1000, width=1024, height=576).validate()
    for bad in (dict(steps=1001), dict(width=1028), dict(height=32), dict(clip_skip=13)):
        with pytest.raises(OptionsError):
            Sampling(prompts=("x",), **bad).validate()
    with pytest.raises(OptionsError, match="no model-based upscalers"):
        Sampling(prompts=("x",), hires=Hires(upscaler="R-ESRGAN 4x+")).validate()
    assert json.loads(json.dumps(Sampling(prompts=("x",), hires=Hires()).to_dict()))["hires"]["upscaler"] == "Latent"


def test_the_cli_takes_a_payload_file_and_flags_over_it(models, tmp_path, capsys):
    from merge_engine.cli import main

    payload = {"prompt": "a cat", "seed": 4, "steps": 3, "cfg_scale": 6, "sampler_name": "Euler a", "width": 64,
               "height": 64, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    (tmp_path / "topic.json").write_text(json.dumps(payload))
    out = tmp_path / "out.png"
    assert main(["preview", str(models / "sd1-0.safetensors"), "--settings", str(tmp_path / "topic.json"),
                 "--hires-scale", "1.5", "--hires-steps", "2", "--vae", str(models / "other-vae.safetensors"),
                 "--mimic-scale", "1", "--freeu", "1.1", "0.9", "1.2", "0.2", "--device", "cpu", "-o", str(out),
                 "--quiet"]) == 0
    text = read_png_parameters(out)
    assert text.startswith("a cat\nSteps: 3, Sampler: Euler a, CFG scale: 6, Seed: 4, Size: 64x64")
    for fragment in ("Clip skip: 2", "VAE: other-vae.safetensors", "Hires upscale: 1.5, Hires steps: 2",
                     "FreeU Version: 2", "Mimic scale: 1"):
        assert fragment in text, fragment
    assert read_png_pixels(out).shape == (96, 96, 3)
    (tmp_path / "bad.json").write_text(json.dumps({**payload, "restore_faces": True}))
    assert main(["preview", str(models / "sd1-0.safetensors"), "--settings", str(tmp_path / "bad.json"),
                 "-o", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "restore_faces" in err and not (tmp_path / "bad.png").exists()
