"""Synthetic checkpoints with the real key names: tiny ones for tests and the demo, full-size
ones for the benchmark.

A tiny model is what the published model would be if built with a small config
(`TINY_CONFIGS`): every key of the layout is there, and every shape follows from the config
the way the full-size shape follows from the published one. The UNet and the VAE use
GroupNorm-8 over 8/16/32 channels (a few MB per model, written in milliseconds); text encoders
keep their 49408 tokens, 77 positions and layer counts, so the key counts equal the real ones.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .architecture import POSITION_IDS, UNET, VAE, VARIANTS, TensorSpec, layout

_UNET = {
    "model_channels": 8, "channel_mult": (1, 2, 4, 4), "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 2, "time_embed_dim": 32, "attention_levels": (True, True, True, False),
    "transformer_layers_per_block": (1, 1, 1, 0), "head_dim": 4, "norm_num_groups": 8,
    "in_channels": 4, "out_channels": 4,
}
_VAE = {"block_out_channels": (8, 16, 32, 32), "layers_per_block": 2, "latent_channels": 4,
        "norm_num_groups": 8, "scaling_factor": 0.18215}
_TEXT = {"vocab_size": 49408, "max_position_embeddings": 77, "num_attention_heads": 4}

# Small configs whose shapes the tiny checkpoints have exactly (read by the preview loader).
# `head_dim` does not change any shape; it is the attention split the preview should use.
TINY_CONFIGS: dict[str, dict[str, dict]] = {
    "sd1": {
        "unet": {**_UNET, "cross_attention_dim": 16, "use_linear_projection": False},
        "text_encoder": {**_TEXT, "kind": "clip", "hidden_size": 16, "intermediate_size": 64,
                         "num_hidden_layers": 12},
        "vae": dict(_VAE),
    },
    "sd2": {
        "unet": {**_UNET, "cross_attention_dim": 32, "use_linear_projection": True},
        "text_encoder": {**_TEXT, "kind": "open_clip", "hidden_size": 32, "intermediate_size": 128,
                         "num_hidden_layers": 24, "projection_dim": 32},
        "vae": dict(_VAE),
    },
    "sdxl": {
        "unet": {**_UNET, "channel_mult": (1, 2, 4), "block_out_channels": (8, 16, 32),
                 "attention_levels": (False, True, True), "transformer_layers_per_block": (0, 2, 10),
                 "cross_attention_dim": 48, "use_linear_projection": True,
                 # pooled text (text_encoder_2 projection, 32) + 6 size/crop embeddings of 8
                 "addition_time_embed_dim": 8, "adm_in_channels": 80},
        "text_encoder": {**_TEXT, "kind": "clip", "hidden_size": 16, "intermediate_size": 64,
                         "num_hidden_layers": 12},
        "text_encoder_2": {**_TEXT, "kind": "open_clip", "hidden_size": 32, "intermediate_size": 128,
                           "num_hidden_layers": 32, "projection_dim": 32},
        "vae": {**_VAE, "scaling_factor": 0.13025},
    },
}

# The published widths the tiny ones replace (UNet and VAE base channels, text widths).
_PUBLISHED = {
    "sd1": {"unet": 320, "context": 768, "text_encoder": 768, "vae": 128},
    "sd2": {"unet": 320, "context": 1024, "text_encoder": 1024, "vae": 128},
    "sdxl": {"unet": 320, "context": 2048, "adm": 2816, "text_encoder": 768, "text_encoder_2": 1280, "vae": 128},
}
_SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
             "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
             "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
             "posterior_mean_coef1", "posterior_mean_coef2")
_CHANNELS = {name: channels for channels, name in VARIANTS.items()}
_STD = 0.02


def _tiny_dim(architecture: str, component: str, dim: int) -> int:
    tiny, full = TINY_CONFIGS[architecture][component], _PUBLISHED[architecture]
    if component == "unet":
        if dim == full["context"]:
            return tiny["cross_attention_dim"]
        if dim == full.get("adm"):
            return tiny["adm_in_channels"]
        if dim % full["unet"] == 0:  # every other UNet width is a multiple of the base channels
            return dim // full["unet"] * tiny["model_channels"]
    elif component == "vae":
        if dim % full["vae"] == 0:
            return dim // full["vae"] * tiny["block_out_channels"][0]
    else:
        for mult in (1, 3, 4):  # width, fused qkv, MLP
            if dim == mult * full[component]:
                return mult * tiny["hidden_size"]
    return dim


def _with_variant(key: str, shape: tuple[int, ...], variant: str) -> tuple[int, ...]:
    if key == UNET + "input_blocks.0.0.weight":
        if variant not in _CHANNELS:
            raise ValueError(f"unknown UNet variant {variant!r}; one of {sorted(_CHANNELS)}")
        return (shape[0], _CHANNELS[variant], *shape[2:])
    return shape


def tiny_specs(architecture: str = "sd2", *, variant: str = "normal") -> dict[str, TensorSpec]:
    """Every weight key of the layout with its tiny shape (floats as F16)."""
    lay = layout(architecture)
    specs = {}
    for component in lay.prefixes:
        for key, spec in lay.component_weights(component).items():
            shape = tuple(_tiny_dim(architecture, component, d) for d in spec.shape)
            specs[key] = TensorSpec(_with_variant(key, shape, variant), spec.dtype)
    return specs


def full_size_specs(architecture: str = "sd2", *, variant: str = "normal") -> dict[str, TensorSpec]:
    """Every weight key of the published layout with its full-size shape (floats as F16)."""
    return {key: TensorSpec(_with_variant(key, spec.shape, variant), spec.dtype)
            for key, spec in layout(architecture).weights.items()}


def tiny_state_dict(
    architecture: str = "sd2",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    variant: str = "normal",
    components: Iterable[str] | None = None,
    extras: bool = True,
    prefix_vae: bool = True,
    ema: bool = False,
    markers: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """A tiny checkpoint with every real key of the chosen components.

    Values are deterministic per (seed, component), so a UNet-only file equals the UNet of the
    full file with the same seed. `extras` adds the DDPM schedule buffers (SD 1/2 only: sgm
    registers none), `ema` the SD1-style EMA copies, `markers` SDXL prediction markers
    ("v_pred", "ztsnr", "edm_vpred"). `prefix_vae=False` writes a standalone-VAE naming.
    """
    lay = layout(architecture)
    wanted = set(lay.prefixes if components is None else components)
    if not wanted <= lay.prefixes.keys():
        raise ValueError(f"{architecture} has no component {sorted(wanted - lay.prefixes.keys())}")
    specs = tiny_specs(architecture, variant=variant)
    out: dict[str, torch.Tensor] = {}
    for index, component in enumerate(lay.prefixes):
        if component not in wanted:
            continue
        generator = torch.Generator().manual_seed(seed * 16 + index)
        for key in lay.component_weights(component):
            name = key[len(VAE):] if component == "vae" and not prefix_vae else key
            out[name] = _value(key, specs[key].shape, generator, dtype)
    if ema and "unet" in wanted:
        for key in lay.component_weights("unet"):
            out["model_ema.diffusion_model" + key[len(UNET):].replace(".", "")] = out[key].clone()
        out["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
        out["model_ema.num_updates"] = torch.tensor(123456, dtype=torch.int32)
    if extras and architecture != "sdxl":
        out.update({name: values.clone() for name, values in _schedule().items()})
    for marker in markers:
        if marker == "edm_vpred":
            out["edm_vpred.sigma_max"] = torch.tensor(120.0)
            out["edm_vpred.sigma_min"] = torch.tensor(0.002)
        elif marker in ("v_pred", "ztsnr"):
            out[marker] = torch.zeros(0, dtype=torch.int64)
        else:
            raise ValueError(f"unknown marker {marker!r}")
    return out


def hybrid_state_dict(*, seed: int = 0, dtype: torch.dtype = torch.float16, converted: int = 8) -> dict[str, torch.Tensor]:
    """A tiny SD2 checkpoint whose first `converted` UNet transformers have SD1's 1x1-conv
    projections: the kind of SD1/SD2 hybrid detection must refuse."""
    out = tiny_state_dict("sd2", seed=seed, dtype=dtype)
    transformers = sorted({k.rsplit(".proj_in.", 1)[0] for k in out if k.endswith(".proj_in.weight")})
    for block in transformers[:converted]:
        for name in ("proj_in.weight", "proj_out.weight"):
            out[f"{block}.{name}"] = out[f"{block}.{name}"][:, :, None, None].contiguous()
    return out


def _value(key: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if key.endswith(POSITION_IDS):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if key.endswith("logit_scale"):
        return torch.full(shape, math.log(100.0), dtype=dtype)  # CLIP's trained temperature
    values = torch.randn(shape, generator=generator) * _STD
    if key.endswith(".weight") and len(shape) == 1:  # rank-1 weights are GroupNorm/LayerNorm gains
        values += 1.0
    return values.to(dtype)


@functools.cache
def _schedule() -> dict[str, torch.Tensor]:
    """The 12 buffers ldm's DDPM registers for the linear beta schedule 0.00085..0.012."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    posterior = betas * (1.0 - prev) / (1.0 - cumprod)
    values = {
        "betas": betas, "alphas_cumprod": cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(), "sqrt_recip_alphas_cumprod": (1.0 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cumprod - 1.0).sqrt(), "posterior_variance": posterior,
        "posterior_log_variance_clipped": posterior.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - prev) * alphas.sqrt() / (1.0 - cumprod),
    }
    return {name: values[name].to(torch.float32) for name in _SCHEDULE}


def write_checkpoint(path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=dict(metadata or {}))
    return path


_DTYPE_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "I64": 8, "I32": 4}
_CHUNK = 1 << 22  # elements generated at a time: memory stays flat whatever the tensor size


def write_random(path: str | os.PathLike[str], specs: Mapping[str, TensorSpec], *, seed: int = 0,
                 metadata: Mapping[str, str] | None = None, device: str = "cpu") -> Path:
    """Write a safetensors file of random values for `specs`, tensor by tensor.

    Floats are F16 normal(0, 0.02) (rank-1 weights around 1); integer keys hold arange. Only
    one chunk is ever in memory; the file appears under its name only once complete.
    """
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for key, spec in specs.items():
        if spec.dtype not in ("F16", "I64", "I32"):
            raise ValueError(f"write_random writes F16 and integer tensors, not {spec.dtype} ({key})")
        size = math.prod(spec.shape) * _DTYPE_SIZES[spec.dtype]
        header[key] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data section to 8 bytes
    generator = torch.Generator(device).manual_seed(seed)  # a GPU draws gigabytes in milliseconds
    buffer = torch.empty(_CHUNK, dtype=torch.float16, device=device)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for key, spec in specs.items():
            n = math.prod(spec.shape)
            if spec.dtype != "F16":
                f.write(torch.arange(n).to(getattr(torch, {"I64": "int64", "I32": "int32"}[spec.dtype])).numpy().tobytes())
                continue
            for start in range(0, n, _CHUNK):
                chunk = buffer[: min(_CHUNK, n - start)]
                torch.randn(chunk.shape, generator=generator, out=chunk, dtype=torch.float16)
                chunk.mul_(_STD)
                if key.endswith(".weight") and len(spec.shape) == 1:
                    chunk.add_(1.0)
                f.write(chunk.cpu().numpy().data)
    os.replace(partial, path)  # no fsync: a benchmark cache needs no durability, only no torn file
    return path


def write_full_size(path: str | os.PathLike[str], architecture: str = "sd2", seed: int = 0, *,
                    variant: str = "normal", components: Iterable[str] | None = None,
                    device: str = "cpu") -> Path:
    """A full-size fp16 checkpoint with the published shapes and random values (benchmarks);
    `components` limits it to those components (a text-encoder-only file, say)."""
    specs = full_size_specs(architecture, variant=variant)
    if components is not None:
        prefixes = tuple(layout(architecture).prefixes[c] for c in components)
        specs = {k: v for k, v in specs.items() if k.startswith(prefixes)}
    return write_random(path, specs, seed=seed, device=device,
                        metadata={"sdmerge.synthetic": f"{architecture} {variant} seed {seed}"})
