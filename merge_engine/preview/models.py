"""Build the sampling modules of an ldm single-file checkpoint, and load weights into them strictly.

No download, ever: what the shapes of a checkpoint cannot tell (attention head split, which
text-encoder layer conditions the UNet, the VAE's latent scale, the prediction type) is package
data (`configs.json`); every width, depth and block layout is read from the shapes. So a tiny
test model goes through exactly the code a published one does.

UNet and VAE are diffusers' `UNet2DConditionModel` and `AutoencoderKL`. diffusers' ldm
converters are run once per layout over placeholder values, which yields a name map (diffusers
parameter -> ldm key); loading is then a tensor-by-tensor copy into the existing parameters,
checked both ways: every module parameter gets exactly one tensor, and every tensor of the
component is used. A missing or extra tensor is an error naming the key, never a silently
random weight. Text encoders are our own modules named like the checkpoint (text_encoders.py).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import nn

from merge_engine.architecture import POSITION_IDS, layout, layout_differences
from merge_engine.errors import CheckpointError
from merge_engine.preview.text_encoders import ClipText, OpenClipText

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers must never reach for the hub
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

Shapes = Mapping[str, tuple[int, ...]]  # component keys, without the component prefix


@functools.cache
def package_config() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("configs.json").read_text())


def architecture_config(architecture: str) -> dict[str, Any]:
    try:
        return package_config()[architecture]
    except KeyError:
        raise CheckpointError(f"no preview support for architecture {architecture!r}") from None


def _groups(channels: int) -> int:
    """GroupNorm groups: the published models use 32; narrower test models as many as fit."""
    return math.gcd(32, channels)


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def unet_config(architecture: str, shapes: Shapes, pooled_width: int | None = None) -> dict[str, Any]:
    """diffusers' UNet2DConditionModel config for an ldm UNet with these shapes."""
    published = architecture_config(architecture)["unet"]
    base = shapes["input_blocks.0.0.weight"]
    model_channels, in_channels = base[0], base[1]
    levels: list[list[int]] = [[]]
    for i in _indices(shapes, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(i)
    channels = [shapes[f"input_blocks.{lv[0]}.0.out_layers.3.weight"][0] for lv in levels]
    depths = [len(_indices(shapes, f"input_blocks.{lv[0]}.1.transformer_blocks.")) for lv in levels]
    attention = [d > 0 for d in depths]
    context = next(v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))
    linear = len(next(v for k, v in shapes.items() if k.endswith("proj_in.weight"))) == 2
    heads = published["heads"]
    head_counts = [heads["count"] if "count" in heads else max(1, c // heads["width"]) for c in channels]
    mid_depth = len(_indices(shapes, "middle_block.1.transformer_blocks."))
    config: dict[str, Any] = {
        "sample_size": architecture_config(architecture)["size"] // 8,
        "in_channels": in_channels,
        "out_channels": shapes["out.2.weight"][0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": channels,
        "layers_per_block": len(levels[0]),
        "cross_attention_dim": context,
        "attention_head_dim": head_counts,  # diffusers' name for the number of heads
        "use_linear_projection": linear,
        "upcast_attention": published["upcast_attention"],
        "norm_num_groups": _groups(model_channels),
        # diffusers gives the mid block the last entry's depth (SDXL: 10; SD1/2: their last level
        # has no attention, so the entry only sets the mid block's depth)
        "transformer_layers_per_block": [d or 1 for d in depths[:-1]] + [depths[-1] or mid_depth or 1],
    }
    if "label_emb.0.0.weight" in shapes:  # SDXL: pooled text + six size/crop embeddings
        adm = shapes["label_emb.0.0.weight"][1]
        if pooled_width is None:
            raise CheckpointError("an SDXL UNet needs its second text encoder's projection width",
                                  component="unet", key="label_emb.0.0.weight")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(adm - pooled_width) // 6,
                      projection_class_embeddings_input_dim=adm)
    return config


def vae_config(architecture: str, shapes: Shapes) -> dict[str, Any]:
    published = architecture_config(architecture)["vae"]
    levels = _indices(shapes, "encoder.down.")
    channels = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels]
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(shapes, "encoder.down.0.block.")),
        "latent_channels": shapes["post_quant_conv.weight"][0],
        "norm_num_groups": _groups(channels[0]),
        "scaling_factor": published["scaling_factor"],
        "force_upcast": published.get("force_upcast", False),
    }


class _Ref(str):
    """A placeholder value for diffusers' converters: the ldm key itself, with a shape."""

    def __new__(cls, key: str, shape: tuple[int, ...]) -> _Ref:
        ref = super().__new__(cls, key)
        ref.shape = shape
        ref.ndim = len(shape)
        return ref

    def __getitem__(self, index: Any) -> _Ref:  # conv -> linear slicing: the copy reshapes anyway
        return self


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise CheckpointError("previews need diffusers: pip install 'sdmerge[preview]'") from None
    return diffusers


def _name_map(kind: str, prefix: str, shapes: Shapes, config: dict[str, Any]) -> dict[str, str]:
    """diffusers parameter name -> ldm key (without the prefix), from diffusers' own converter."""
    _diffusers()
    from diffusers.loaders import single_file_utils as convert

    placeholders = {prefix + k: _Ref(k, s) for k, s in shapes.items()}
    if kind == "unet":
        converted = convert.convert_ldm_unet_checkpoint(placeholders, config)
    else:
        converted = convert.convert_ldm_vae_checkpoint(placeholders, config)
    return {name: str(ref) for name, ref in converted.items() if ref is not None}


def _diffusers_module(kind: str, config: dict[str, Any]) -> nn.Module:
    diffusers = _diffusers()
    cls = diffusers.UNet2DConditionModel if kind == "unet" else diffusers.AutoencoderKL
    with torch.device("meta"):
        return cls(**config)


@dataclass
class ComponentModule:
    """One loaded component: its module and how checkpoint keys map onto its parameters."""

    component: str
    module: nn.Module
    sources: dict[str, str]  # module parameter name -> component key (without prefix)
    settings: dict[str, Any]  # text encoders: layer, final_norm, pooled

    def targets(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(component key, parameter) for every parameter, in module order."""
        params = dict(self.module.named_parameters())
        for name, source in self.sources.items():
            yield source, params[name]


def build_component(architecture: str, component: str, shapes: Shapes, *,
                    pooled_width: int | None = None, model: str | None = None) -> ComponentModule:
    """An empty module (on the meta device) for a component with these shapes, and its name map."""
    if component in ("unet", "vae"):
        config = (unet_config(architecture, shapes, pooled_width) if component == "unet"
                  else vae_config(architecture, shapes))
        module = _diffusers_module(component, config)
        prefix = layout(architecture).prefixes[component]
        sources = _name_map(component, prefix, shapes, config)
        settings: dict[str, Any] = {"config": config}
    else:
        settings = dict(architecture_config(architecture)["text_encoders"][component])
        cls = ClipText if settings["kind"] == "clip" else OpenClipText
        with torch.device("meta"):
            module = cls.from_shapes(shapes)
        sources = {name: name for name, _ in module.named_parameters()}
    _check_names(module, sources, shapes, component, model)
    return ComponentModule(component, module, sources, settings)


def _check_names(module: nn.Module, sources: dict[str, str], shapes: Shapes, component: str,
                 model: str | None) -> None:
    params = dict(module.named_parameters())
    unmapped = sorted(params.keys() - sources.keys())
    if unmapped:
        raise CheckpointError(f"the checkpoint has no tensor for the module parameter {unmapped[0]} "
                              f"({len(unmapped)} missing)", model=model, component=component)
    used = set(sources.values())
    unused = sorted(k for k in shapes if k not in used and not k.endswith(POSITION_IDS))
    if unused:
        raise CheckpointError(f"tensor not used by the {component} module ({len(unused)} unused)",
                              model=model, component=component, key=unused[0])
    for name, source in sources.items():
        want, have = tuple(params[name].shape), shapes[source]
        if math.prod(want) != math.prod(have):
            raise CheckpointError(f"shape {list(have)} does not fit the module's {name} {list(want)}",
                                  model=model, component=component, key=source)


def check_complete(architecture: str, component: str, keys: list[str], model: str | None) -> None:
    """Every key of the published layout must be there, and nothing else (strict loading);
    `keys` are canonical, with the component prefix."""
    extra, missing = layout_differences(architecture, component, keys)
    if missing:
        raise CheckpointError(f"missing tensor ({len(missing)} missing): the preview never runs with "
                              "random weights", model=model, component=component, key=missing[0])
    if extra:
        raise CheckpointError(f"unexpected tensor ({len(extra)} not in the {architecture} layout)",
                              model=model, component=component, key=extra[0])
