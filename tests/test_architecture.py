"""Architecture detection on tiny checkpoints written to disk and on full-size layouts."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors import safe_open

from merge_engine.architecture import (
    TensorSpec,
    check_compatible,
    component_of,
    detect,
    layout,
    native_dtype,
)
from merge_engine.errors import ArchitectureError, CheckpointError
from merge_engine.synthetic import full_size_specs, hybrid_state_dict, write_checkpoint
from merge_engine.synthetic import tiny_state_dict as _tiny_state_dict

torch.set_num_threads(1)

COUNTS = {
    "sd1": {"unet": 686, "text_encoder": 197, "vae": 248},
    "sd2": {"unet": 686, "text_encoder": 294, "vae": 248},
    "sdxl": {"unet": 1680, "text_encoder": 197, "text_encoder_2": 390, "vae": 248},
}


@functools.cache
def _cached(architecture, options):
    return _tiny_state_dict(architecture, **dict(options))


def tiny_state_dict(architecture, **options):
    """A fresh dict over cached tensors: tests replace entries, never modify tensors in place."""
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return dict(_cached(architecture, tuple(sorted(options.items()))))


def header(path) -> dict[str, TensorSpec]:
    with safe_open(str(path), "pt") as f:
        return {k: TensorSpec(tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def written(tmp_path, state_dict, name="model.safetensors") -> dict[str, TensorSpec]:
    return header(write_checkpoint(tmp_path / name, state_dict))


def specs(state_dict) -> dict[str, TensorSpec]:
    return {k: TensorSpec.of(v) for k, v in state_dict.items()}


@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
def test_tiny_full_checkpoint_is_detected_from_its_file(tmp_path, architecture):
    info = detect(written(tmp_path, tiny_state_dict(architecture, seed=1)), model="tiny")
    assert info.architecture == architecture
    assert info.variant == "normal"
    assert {c: len(k) for c, k in info.components.items()} == COUNTS[architecture]
    assert info.reference_layout == {c: False for c in COUNTS[architecture]}
    schedule = {k for k, role in layout(architecture).roles.items() if role == "noise_schedule_buffer"}
    assert set(info.other) == (set() if architecture == "sdxl" else schedule)
    assert info.warnings == ()
    assert info.flags == {"v_pred": False, "ztsnr": False, "edm_vpred": False}
    assert all(info.key_map[k] == k for k in info.key_map)


def test_schedule_buffers_are_other_keys():
    info = detect(tiny_state_dict("sd2"))
    assert len(info.other) == 12 and "alphas_cumprod" in info.other
    assert all(component_of(k) is None for k in info.other)


@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
def test_full_size_layout_matches_the_reference(architecture):
    info = detect(full_size_specs(architecture))
    assert info.architecture == architecture
    assert info.reference_layout == {c: True for c in COUNTS[architecture]}
    assert info.warnings == ()


@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
def test_unet_only(architecture):
    info = detect(tiny_state_dict(architecture, components=["unet"], extras=False))
    assert info.architecture == architecture and list(info.components) == ["unet"]


@pytest.mark.parametrize(("architecture", "component"),
                         [("sd1", "text_encoder"), ("sd2", "text_encoder"), ("sdxl", "text_encoder"),
                          ("sdxl", "text_encoder_2")])
def test_text_encoder_only_file(tmp_path, architecture, component):
    info = detect(written(tmp_path, tiny_state_dict(architecture, components=[component], extras=False)))
    assert info.architecture == architecture and info.variant is None
    assert list(info.components) == [component]


@pytest.mark.parametrize("prefix_vae", [True, False])
def test_vae_only_file_has_no_family(tmp_path, prefix_vae):
    state = tiny_state_dict("sd1", components=["vae"], extras=False, prefix_vae=prefix_vae)
    info = detect(written(tmp_path, state), model="vae-ft-mse")
    assert info.architecture is None and info.variant is None
    assert len(info.components["vae"]) == 248
    assert all(k.startswith("first_stage_model.") for k in info.components["vae"])
    stored = "encoder.conv_in.weight" if not prefix_vae else "first_stage_model.encoder.conv_in.weight"
    assert info.key_map["first_stage_model.encoder.conv_in.weight"] == stored
    assert any("cannot be told" in w for w in info.warnings)


def test_standalone_full_size_vae_matches_the_reference():
    bare = {k.removeprefix("first_stage_model."): s for k, s in full_size_specs("sd1").items()
            if k.startswith("first_stage_model.")}
    assert detect(bare).reference_layout == {"vae": True}


def test_sd1_sd2_hybrid_unet_is_rejected():
    with pytest.raises(ArchitectureError, match="hybrid") as caught:
        detect(hybrid_state_dict(), model="hybrid.safetensors")
    assert caught.value.model == "hybrid.safetensors" and caught.value.component == "unet"
    assert caught.value.key.endswith("proj_in.weight")


def test_sd1_unet_with_sd2_cross_attention_width_is_rejected():
    full = dict(full_size_specs("sd1"))
    for key, spec in full.items():
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            full[key] = TensorSpec((spec.shape[0], 1024), "F16")
    del full["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    with pytest.raises(ArchitectureError, match="hybrid"):
        detect(full)


def test_text_encoder_of_another_family_is_rejected():
    state = tiny_state_dict("sd2", components=["unet", "vae"])
    state.update(tiny_state_dict("sd1", components=["text_encoder"], extras=False))
    with pytest.raises(ArchitectureError, match="text encoder is sd1 but the UNet is sd2"):
        detect(state, model="mixed")


def test_text_width_must_match_cross_attention():
    state = tiny_state_dict("sd1")
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    state[key] = torch.zeros(49408, 48, dtype=torch.float16)
    with pytest.raises(ArchitectureError, match="width 48") as caught:
        detect(state, model="m")
    assert caught.value.key == key


@pytest.mark.parametrize(("variant", "channels"), [("inpainting", 9), ("instruct-pix2pix", 8), ("depth", 5)])
def test_unet_input_variants(variant, channels):
    info = detect(tiny_state_dict("sd1", variant=variant, components=["unet"]))
    assert info.variant == variant
    assert detect(full_size_specs("sd1", variant=variant)).reference_layout["unet"] is True


def test_unknown_input_channels_are_refused():
    state = tiny_state_dict("sd2", components=["unet"])
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 7, 3, 3)
    with pytest.raises(ArchitectureError, match="7 input channels"):
        detect(state)


def test_inpainting_does_not_mix_with_plain(tmp_path):
    parts = ["unet", "text_encoder"]
    plain = detect(written(tmp_path, tiny_state_dict("sd1", components=parts), "plain.safetensors"), model="plain")
    inpaint = detect(written(tmp_path, tiny_state_dict("sd1", variant="inpainting", components=parts),
                             "inp.safetensors"), model="inp")
    assert check_compatible([("plain", plain), ("inp", inpaint)], "text_encoder") == []
    with pytest.raises(ArchitectureError) as caught:
        check_compatible([("plain", plain), ("inp", inpaint)], "unet")
    assert "plain" in str(caught.value) and "inp" in str(caught.value)
    assert caught.value.component == "unet"


def test_families_do_not_mix():
    sd1, sd2, sdxl = (detect(tiny_state_dict(a), model=a) for a in ("sd1", "sd2", "sdxl"))
    with pytest.raises(ArchitectureError, match="'sd1'.*'sd2'") as caught:
        check_compatible([("sd1", sd1), ("sd2", sd2)], "vae")
    assert caught.value.details["models"] == ["sd1", "sd2"]
    with pytest.raises(ArchitectureError):
        check_compatible([("sdxl", sdxl), ("sd1", sd1)], "text_encoder")
    with pytest.raises(CheckpointError, match="no text_encoder_2"):
        check_compatible([("sdxl", sdxl), ("sd1", sd1)], "text_encoder_2")


def test_vae_only_file_fits_any_family_with_a_warning():
    sd2 = detect(tiny_state_dict("sd2"), model="sd2")
    vae = detect(tiny_state_dict("sd2", components=["vae"], prefix_vae=False, extras=False), model="vae")
    warnings = check_compatible([("sd2", sd2), ("vae", vae)], "vae")
    assert len(warnings) == 1 and "vae" in warnings[0] and "sd2" in warnings[0]


def test_sdxl_refiner_is_refused():
    state = tiny_state_dict("sdxl", components=["unet", "vae"])
    te2 = tiny_state_dict("sdxl", components=["text_encoder_2"])
    state.update({k.replace("embedders.1.", "embedders.0."): v for k, v in te2.items()})
    with pytest.raises(ArchitectureError, match="refiner.*not supported"):
        detect(state, model="refiner")


def test_unet_with_class_embedding_and_twelve_blocks_is_refused():
    state = tiny_state_dict("sd2", components=["unet"])
    state["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(128, 64)
    with pytest.raises(ArchitectureError, match="not supported"):
        detect(state)


def test_float_position_ids_are_corrupt():
    state = tiny_state_dict("sd1")
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    state[key] = state[key].float()
    with pytest.raises(CheckpointError, match="corrupt") as caught:
        detect(state, model="broken")
    assert caught.value.key == key and caught.value.model == "broken"


def test_older_sd1_clip_naming_is_mapped(tmp_path):
    state = {k.replace("transformer.text_model.", "transformer."): v
             for k, v in tiny_state_dict("sd1", components=["text_encoder"], extras=False).items()}
    info = detect(written(tmp_path, state))
    canonical = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert canonical in info.components["text_encoder"]
    assert info.key_map[canonical] == "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"
    legacy_full = {k.replace("transformer.text_model.", "transformer."): s for k, s in full_size_specs("sd1").items()}
    assert detect(legacy_full).reference_layout["text_encoder"] is True


def test_ema_keys_are_classified(tmp_path):
    info = detect(written(tmp_path, tiny_state_dict("sd1", components=["unet"], extras=False, ema=True)))
    assert len(info.ema) == 686 + 2
    assert "model_ema.diffusion_modelinput_blocks00weight" in info.ema
    assert len(info.components["unet"]) == 686
    assert not any(k.startswith("model_ema.") for k in info.other)


def test_prediction_markers_are_flags():
    info = detect(tiny_state_dict("sdxl", markers=["v_pred", "ztsnr"]))
    assert info.flags == {"v_pred": True, "ztsnr": True, "edm_vpred": False}
    assert set(info.other) == {"v_pred", "ztsnr"} and info.warnings == ()
    edm = detect(tiny_state_dict("sdxl", markers=["edm_vpred"]), model="cosxl")
    assert edm.flags["edm_vpred"] is True
    plain = detect(tiny_state_dict("sdxl"), model="plain")
    warnings = check_compatible([("plain", plain), ("cosxl", edm)], "unet")
    assert len(warnings) == 1 and "v-prediction" in warnings[0]


def test_file_without_any_component_names_model_and_key():
    with pytest.raises(CheckpointError, match="no Stable Diffusion component") as caught:
        detect({"lora_unet_down.alpha": TensorSpec((), "F32")}, model="lora.safetensors")
    assert caught.value.model == "lora.safetensors" and caught.value.key == "lora_unet_down.alpha"


def test_unknown_keys_outside_components_warn():
    state = tiny_state_dict("sd2")
    state["some_trainer.step"] = torch.tensor(3)
    info = detect(state)
    assert "some_trainer.step" in info.other
    assert any("not known" in w for w in info.warnings)


def test_diffusers_format_vae_is_refused():
    with pytest.raises(CheckpointError, match="diffusers"):
        detect({"encoder.down_blocks.0.resnets.0.conv1.weight": TensorSpec((32, 32, 3, 3), "F16")})


def test_two_namings_of_one_tensor_are_refused():
    state = tiny_state_dict("sd1", components=["vae"])
    state["encoder.conv_in.weight"] = state["first_stage_model.encoder.conv_in.weight"]
    with pytest.raises(CheckpointError, match="same tensor"):
        detect(state)


def test_detect_accepts_tensors_specs_and_header_objects():
    state = tiny_state_dict("sd2", components=["vae"], extras=False)
    assert detect(state).components == detect(specs(state)).components


def test_component_of_and_native_dtype():
    assert component_of("model.diffusion_model.out.2.bias") == "unet"
    assert component_of("cond_stage_model.model.ln_final.weight") == "text_encoder"
    assert component_of("conditioner.embedders.1.model.ln_final.weight") == "text_encoder_2"
    assert component_of("first_stage_model.decoder.conv_out.bias") == "vae"
    assert component_of("alphas_cumprod") is None
    assert native_dtype("sd2", "alphas_cumprod") == "F32"
    assert native_dtype("sdxl", "denoiser.sigmas") == "F32"
    assert native_dtype(None, "edm_vpred.sigma_max") == "F32"
    assert native_dtype("sd1", "model_ema.num_updates") == "I32"
    assert native_dtype("sd1", "cond_stage_model.transformer.text_model.embeddings.position_ids") == "I64"
    assert native_dtype("sd2", "model.diffusion_model.out.2.bias") is None
