"""Architecture knowledge: which Stable Diffusion family a checkpoint is, and what it holds.

The published layouts (key -> full-size shape) live as data in `layouts/*.json`. Detection
reads structure only -- key names, tensor ranks and which widths must agree -- so a tiny
model with real key names is recognised like a full-size one; whether the shapes are the
published ones is reported separately (`ModelInfo.reference_layout`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from .errors import ArchitectureError, CheckpointError

ARCHITECTURES = ("sd1", "sd2", "sdxl")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
VARIANTS = {4: "normal", 9: "inpainting", 8: "instruct-pix2pix", 5: "depth"}
UNET = "model.diffusion_model."
VAE = "first_stage_model."
POSITION_IDS = "embeddings.position_ids"  # optional since transformers 4.31 stopped saving it

_COMPONENT_PREFIXES = (
    (UNET, "unet"),
    ("cond_stage_model.", "text_encoder"),
    ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
    (VAE, "vae"),
)
_TEXT_FAMILIES = (
    ("cond_stage_model.transformer.", "sd1"),
    ("cond_stage_model.model.", "sd2"),
    ("conditioner.embedders.", "sdxl"),
)
# Standalone VAE files (vae-ft-mse-840000-ema-pruned, ...) store the VAE without its prefix.
_BARE_VAE = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# NovelAI-era SD1 files name CLIP without the `text_model.` level of transformers 4.x.
_CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
_LEGACY_CLIP = ("embeddings.", "encoder.", "final_layer_norm.")
_TOKEN_EMBEDDING = {
    "cond_stage_model.transformer.": "text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.0.transformer.": "text_model.embeddings.token_embedding.weight",
    "cond_stage_model.model.": "token_embedding.weight",
    "conditioner.embedders.1.model.": "token_embedding.weight",
}
_PUBLISHED_CONTEXT = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
_PROJ = re.compile(r"\.proj_(in|out)\.weight$")
_CROSS = re.compile(r"\.attn2\.to_[kv]\.weight$")
_TORCH_DTYPES = {
    "torch.float16": "F16", "torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float64": "F64",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
    "torch.uint8": "U8", "torch.bool": "BOOL", "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F16, F32, BF16, I64, ...

    @classmethod
    def of(cls, tensor: Any) -> TensorSpec:
        """Anything with `.shape` and `.dtype` (a header entry, a torch tensor) as a spec."""
        dtype = tensor.dtype if isinstance(tensor.dtype, str) else _TORCH_DTYPES.get(str(tensor.dtype))
        if dtype is None:
            raise CheckpointError(f"unsupported tensor dtype {tensor.dtype}")
        return cls(tuple(int(d) for d in tensor.shape), dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("F", "BF"))


@dataclass(frozen=True)
class Layout:
    """One architecture's published single-file layout."""

    architecture: str
    prefixes: dict[str, str]  # component -> key prefix
    weights: dict[str, TensorSpec]  # canonical key -> full-size spec
    extra: dict[str, TensorSpec]  # optional non-weight keys (schedule buffers, markers, ...)
    roles: dict[str, str]  # extra key -> role

    def component_weights(self, component: str) -> dict[str, TensorSpec]:
        prefix = self.prefixes[component]
        return {k: s for k, s in self.weights.items() if k.startswith(prefix)}


@functools.cache
def layout(architecture: str) -> Layout:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}")
    data = json.loads(resources.files(__package__).joinpath(f"layouts/{architecture}.json").read_text())
    weights = {}
    for component in data["components"].values():
        for name, shape in component["keys"].items():
            key = component["prefix"] + name
            weights[key] = TensorSpec(tuple(shape), data["integer_keys"].get(key, data["float_dtype"]))
    extra = {k: TensorSpec(tuple(v["shape"]), v["dtype"]) for k, v in data["extra"].items()}
    return Layout(
        architecture,
        {c: v["prefix"] for c, v in data["components"].items()},
        weights,
        extra,
        {k: v["role"] for k, v in data["extra"].items()},
    )


@dataclass(frozen=True)
class ModelInfo:
    architecture: str | None  # None: a component-only file whose family cannot be told (a VAE)
    variant: str | None  # None when there is no UNet
    components: dict[str, tuple[str, ...]] = field(default_factory=dict)
    other: tuple[str, ...] = ()
    ema: tuple[str, ...] = ()
    key_map: dict[str, str] = field(default_factory=dict)  # canonical key -> key in the file
    flags: dict[str, bool] = field(default_factory=dict)
    reference_layout: dict[str, bool] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def stored_key(self, key: str) -> str:
        return self.key_map.get(key, key)


def component_of(key: str) -> str | None:
    """The component a canonical key belongs to, or None for keys outside every component."""
    for prefix, component in _COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return component
    return None


def native_dtype(architecture: str | None, key: str) -> str | None:
    """The dtype a key has by nature (fp32 buffers, integers), or None for ordinary weights."""
    order = ([architecture] if architecture in ARCHITECTURES else []) + list(ARCHITECTURES)
    for arch in order:
        found = layout(arch).extra.get(key) or layout(arch).weights.get(key)
        if found is not None and found.dtype != "F16":
            return found.dtype
    return None


def detect(tensors: Mapping[str, Any], *, model: str | None = None) -> ModelInfo:
    """Classify a checkpoint from its header: family, UNet variant, components, flags."""
    specs = {key: TensorSpec.of(value) for key, value in tensors.items()}
    key_map = _canonical_names(specs, model)
    canon = {key: specs[stored] for key, stored in key_map.items()}
    components: dict[str, list[str]] = {}
    other, ema = [], []
    for key in canon:
        component = None if key.startswith("model_ema.") else component_of(key)
        if component:
            components.setdefault(component, []).append(key)
        else:
            (ema if key.startswith("model_ema.") else other).append(key)
    if any(k.startswith("conditioner.embedders.0.model.") for k in canon) and not components.get("text_encoder_2"):
        raise ArchitectureError("SDXL refiner checkpoints are not supported", model=model,
                                key=next(k for k in canon if k.startswith("conditioner.embedders.0.model.")))
    if not components:
        example = next(iter(tensors), None)
        raise CheckpointError("no Stable Diffusion component (UNet, text encoder or VAE) found",
                              model=model, key=example)
    for key in canon:
        if key.endswith(POSITION_IDS) and canon[key].is_float:
            raise CheckpointError(f"position_ids stored as {canon[key].dtype}: the file is corrupt "
                                  "(an index buffer was averaged or cast)", model=model, key=key_map[key])

    families = {family for prefix, family in _TEXT_FAMILIES for k in canon if k.startswith(prefix)}
    if len(families) > 1:
        raise ArchitectureError(f"text encoders of different families ({', '.join(sorted(families))}) "
                                "in one file", model=model, component="text_encoder")
    variant, context = None, None
    if "unet" in components:
        unet_family, context = _unet_family(canon, model)
        if families and unet_family not in families:
            raise ArchitectureError(f"the text encoder is {families.pop()} but the UNet is {unet_family}",
                                    model=model, component="unet")
        families = {unet_family}
        variant = _variant(canon, model)
    architecture = families.pop() if families else None
    if context is not None:
        _check_text_width(canon, architecture, context, model)

    components = {c: components[c] for c in COMPONENTS if c in components}
    warnings = []
    if architecture is None:
        warnings.append("the VAE's family (SD 1.x/2.x or SDXL) cannot be told from its header")
    reference = {}
    for component, keys in components.items():
        reference[component], notes = _compare_layout(architecture or "sd1", component, keys, canon, variant, model)
        warnings += notes
    known = {k for arch in ARCHITECTURES for k in layout(arch).extra}
    unknown = [k for k in other if k not in known and not k.startswith("depth_model.")]
    if unknown:
        warnings.append(f"{len(unknown)} keys outside every component are not known (e.g. {unknown[0]})")
    flags = {"v_pred": "v_pred" in canon, "ztsnr": "ztsnr" in canon,
             "edm_vpred": any(k.startswith("edm_vpred.") for k in canon)}
    return ModelInfo(
        architecture, variant, {c: tuple(sorted(k)) for c, k in components.items()},
        tuple(sorted(other)), tuple(sorted(ema)), key_map, flags, reference, tuple(warnings),
    )


def check_compatible(infos: Sequence[tuple[str, ModelInfo]], component: str) -> list[str]:
    """Refuse sources of one component that mix families or UNet variants; return warnings."""
    warnings: list[str] = []
    if not infos:
        return warnings
    for name, info in infos:
        if component not in info.components:
            raise CheckpointError(f"model has no {component}", model=name, component=component)
    known = [(name, info) for name, info in infos if info.architecture is not None]
    for name, info in known[1:]:
        first, first_info = known[0]
        if info.architecture != first_info.architecture:
            raise ArchitectureError(
                f"cannot merge the {component} of {first_info.architecture} model {first!r} with "
                f"{info.architecture} model {name!r}", model=name, component=component,
                details={"models": [first, name], "architectures": [first_info.architecture, info.architecture]},
            )
    family = known[0][1].architecture if known else None
    for name, info in infos:
        if info.architecture is None and family is not None:
            warnings.append(f"{name}: the {component}'s family cannot be told from its header; "
                            f"assuming it is {family} (an SDXL VAE does not fit SD 1.x/2.x, nor the reverse)")
    if component == "unet":
        first, first_info = infos[0]
        for name, info in infos[1:]:
            if info.variant != first_info.variant:
                raise ArchitectureError(
                    f"cannot merge the {first_info.variant} UNet of {first!r} with the {info.variant} UNet "
                    f"of {name!r}", model=name, component=component,
                    details={"models": [first, name], "variants": [first_info.variant, info.variant]},
                )
        for name, info in infos[1:]:
            if info.flags != first_info.flags:
                warnings.append(f"{name}: prediction markers {_on(info.flags)} differ from "
                                f"{_on(first_info.flags)} in {first} (epsilon and v-prediction do not mix)")
    return warnings


def _on(flags: Mapping[str, bool]) -> str:
    return "+".join(k for k, v in flags.items() if v) or "none"


def _canonical_names(specs: Mapping[str, TensorSpec], model: str | None) -> dict[str, str]:
    key_map: dict[str, str] = {}
    for stored in specs:
        key = stored
        if stored.startswith(_BARE_VAE):
            key = VAE + stored
        else:
            for prefix in _CLIP_PREFIXES:
                if stored.startswith(prefix) and stored[len(prefix):].startswith(_LEGACY_CLIP):
                    key = prefix + "text_model." + stored[len(prefix):]
        if key in key_map:
            raise CheckpointError(f"keys {key_map[key]!r} and {stored!r} name the same tensor",
                                  model=model, key=stored)
        key_map[key] = stored
    return key_map


def _unet_family(canon: Mapping[str, TensorSpec], model: str | None) -> tuple[str, int]:
    """sd1/sd2/sdxl from the UNet's structure, and its cross-attention width."""
    has_label = UNET + "label_emb.0.0.weight" in canon
    deep = any(k.startswith(UNET + "input_blocks.9.") for k in canon)
    if has_label and deep:
        raise ArchitectureError("a UNet with a class embedding and twelve input blocks (SDXL refiner or "
                                "SD 2 unCLIP) is not supported", model=model, component="unet",
                                key=UNET + "label_emb.0.0.weight")
    reference = layout("sd2" if deep else "sdxl")
    discriminators = [k for k in reference.component_weights("unet") if _PROJ.search(k) or _CROSS.search(k)]
    if not deep:
        discriminators.append(UNET + "label_emb.0.0.weight")
    missing = [k for k in discriminators if k not in canon]
    if missing:
        raise CheckpointError(f"incomplete UNet: {len(missing)} structural keys missing",
                              model=model, component="unet", key=missing[0])
    ranks = {k: len(canon[k].shape) for k in discriminators if _PROJ.search(k)}
    widths = {k: canon[k].shape[-1] for k in discriminators if _CROSS.search(k)}
    rank = _agreeing(ranks, "projection rank", model)
    context = _agreeing(widths, "cross-attention width", model)
    if deep:
        family = {4: "sd1", 2: "sd2"}.get(rank)
    else:
        family = "sdxl" if rank == 2 else None
    if family is None:
        raise ArchitectureError(f"UNet transformer projections of rank {rank} fit no known family",
                                model=model, component="unet", key=next(iter(ranks)))
    published = {f for f, width in _PUBLISHED_CONTEXT.items() if width == context}
    if published and family not in published:
        raise ArchitectureError(
            f"hybrid UNet: {family} projections with the {published.pop()} cross-attention width {context}",
            model=model, component="unet", key=next(iter(widths)))
    return family, context


def _agreeing(values: Mapping[str, int], what: str, model: str | None) -> int:
    first_key, first = next(iter(values.items()))
    for key, value in values.items():
        if value != first:
            raise ArchitectureError(f"hybrid UNet: {what} {value} here but {first} at {first_key}",
                                    model=model, component="unet", key=key)
    return first


def _variant(canon: Mapping[str, TensorSpec], model: str | None) -> str:
    key = UNET + "input_blocks.0.0.weight"
    if key not in canon or len(canon[key].shape) != 4:
        raise CheckpointError("incomplete UNet: no 4-D input convolution", model=model, component="unet", key=key)
    channels = canon[key].shape[1]
    if channels not in VARIANTS:
        raise ArchitectureError(f"a UNet with {channels} input channels is not a supported variant",
                                model=model, component="unet", key=key)
    return VARIANTS[channels]


def _check_text_width(canon: Mapping[str, TensorSpec], architecture: str | None, context: int,
                      model: str | None) -> None:
    widths = {}
    for prefix, name in _TOKEN_EMBEDDING.items():
        spec = canon.get(prefix + name)
        if spec is not None and len(spec.shape) == 2:
            widths[prefix + name] = spec.shape[1]
    if not widths or (architecture == "sdxl" and len(widths) < 2):
        return  # a text encoder is missing: nothing to compare against
    total = sum(widths.values())  # SDXL concatenates both encoders' hidden states
    if total != context:
        raise ArchitectureError(
            f"text encoder width {total} does not match the UNet's cross-attention width {context}",
            model=model, component="text_encoder", key=next(iter(widths)))


def layout_differences(architecture: str, component: str, keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """A component's keys (canonical, with prefix) against the published layout: those it has
    that the layout lacks, and those of the layout it lacks (position ids are optional)."""
    expected = layout(architecture).component_weights(component)
    keys = set(keys)
    return (sorted(keys - expected.keys()),
            sorted(k for k in expected.keys() - keys if not k.endswith(POSITION_IDS)))


def _compare_layout(architecture: str, component: str, keys: Iterable[str],
                    canon: Mapping[str, TensorSpec], variant: str | None,
                    model: str | None) -> tuple[bool, list[str]]:
    """Whether a component has the published keys and full-size shapes; warnings on its names."""
    reference = layout(architecture)
    if component not in reference.prefixes:
        return False, [f"{component} is not part of the {architecture} layout"]
    expected = dict(reference.component_weights(component))
    channels = {v: c for c, v in VARIANTS.items()}.get(variant or "normal", 4)
    first_conv = UNET + "input_blocks.0.0.weight"
    if component == "unet":
        shape = expected[first_conv].shape
        expected[first_conv] = TensorSpec((shape[0], channels, *shape[2:]), expected[first_conv].dtype)
    keys = set(keys)
    unknown, missing = layout_differences(architecture, component, keys)
    notes = []
    if unknown and len(unknown) == len(keys):
        raise CheckpointError(f"the {component} keys do not follow the single-file (ldm) layout; "
                              "diffusers-format files are not supported", model=model, component=component,
                              key=unknown[0])
    if unknown:
        notes.append(f"{component}: {len(unknown)} keys not in the {architecture} layout (e.g. {unknown[0]})")
    if missing:
        notes.append(f"{component}: {len(missing)} keys of the {architecture} layout missing (e.g. {missing[0]})")
    same = not unknown and not missing and all(canon[k].shape == expected[k].shape for k in keys)
    return same, notes
