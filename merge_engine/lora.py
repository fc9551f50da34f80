"""A LoRA file read as the deltas it adds to a checkpoint's weights, key by key.

A LoRA file holds, per module it trains, small factors: LoRA/LoCon `up @ down`, LoHa
`(w1a @ w1b) * (w2a @ w2b)`, LoKr `kron(w1, w2)` (either factor possibly itself a product), each
scaled by `alpha / rank` where the file records an alpha (the WebUI's rule: no alpha, scale 1).
Modules are named in one of the formats trainers write:

* kohya / LyCORIS: `lora_unet_<module path with _>`, `lora_te_…` (SD1/SD2), `lora_te1_…`,
  `lora_te2_…` (SDXL), the UNet path in diffusers' names (SD1/SD2) or the checkpoint's own (SDXL);
* diffusers / PEFT: `unet.<path>`, `text_encoder.<path>`, `text_encoder_2.<path>` with
  `lora_A`/`lora_B`, `lora.down`/`lora.up`, or the older `processor.to_q_lora.down` forms.

`index(...)` names every module a model can take, in every format, from the model's own keys: a
module is matched by lookup, never by guessing where underscores were dots. Text-encoder modules
of OpenCLIP models (SD2, SDXL's second encoder) train q, k and v apart; they land on row slices
of the fused `in_proj_weight`.

`LoraDelta` stands in for a checkpoint in the plan (its tensors are the deltas, fp32 or fp64,
shaped as the keys they change), so baking is a weighted sum like any linear merge, streamed key
by key: a delta is computed when a key is first read and dropped soon after.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .architecture import ModelInfo
from .checkpoint import ITEMSIZE, Checkpoint
from .errors import ArchitectureError, LayoutMismatchError, RecipeError
from .header import TensorInfo

# The tensors of one module, by the suffix after the module's name.
FACTORS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up", "alpha": "alpha",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
    "lokr_w1": "k1", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b", "lokr_w2": "k2", "lokr_w2_a": "k2a", "lokr_w2_b": "k2b",
}
UNSUPPORTED = {  # trained forms whose delta is not a plain product of the factors above
    "lora_mid.weight": "a LoCon with a Tucker (CP) middle factor", "hada_t1": "a LoHa with Tucker factors",
    "hada_t2": "a LoHa with Tucker factors", "lokr_t2": "a LoKr with a Tucker factor",
    "dora_scale": "DoRA (a weight-decomposed LoRA)", "on_input": "(IA)^3",
    "diff": "a full-weight difference module", "diff_b": "a full-bias difference module",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "oft_blocks": "OFT", "oft_diag": "OFT", "lora_magnitude_vector": "DoRA (a weight-decomposed LoRA)",
}
_SUFFIXES = sorted([*FACTORS, *UNSUPPORTED], key=len, reverse=True)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
CACHE_BYTES = 256 << 20  # deltas kept for the threads reading the same key's chunks

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
             "out.0": "conv_norm_out", "out.2": "conv_out", "input_blocks.0.0": "conv_in"}
_CLIP_MODULES = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# Per component: the prefix of its keys in the checkpoint, the transformers-style path start, and
# the module-name prefixes trainers give it.
_TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", ("lora_te_", "text_encoder."))},
    "sd2": {"text_encoder": ("cond_stage_model.model.", ("lora_te_", "text_encoder."))},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", ("lora_te1_", "text_encoder.")),
             "text_encoder_2": ("conditioner.embedders.1.model.", ("lora_te2_", "text_encoder_2."))},
}
_UNET_PREFIXES = ("lora_unet_", "unet.", "base_model.model.", "")


@dataclass(frozen=True)
class Target:
    component: str
    key: str  # the checkpoint key (canonical) the module's delta is added to
    rows: tuple[int, int] | None = None  # a row slice of it (q, k or v of a fused in_proj_weight)


def diffusers_unet_path(path: str) -> str | None:
    """A UNet module's path in diffusers' names, from the checkpoint's (`input_blocks.4.1.proj_in`
    -> `down_blocks.1.attentions.0.proj_in`); None where diffusers has no such module."""
    for ldm, name in _UNET_TOP.items():
        if path == ldm:
            return name
    parts = path.split(".")
    if parts[0] == "middle_block" and len(parts) > 2:
        inner = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}.get(parts[1])
        return None if inner is None else _inner(f"mid_block.{inner}", parts[2:])
    if parts[0] not in ("input_blocks", "output_blocks") or len(parts) < 3 or not parts[1].isdigit():
        return None
    n, m, rest = int(parts[1]), parts[2], parts[3:]
    if parts[0] == "input_blocks":
        level, j = divmod(n - 1, 3)
        if n == 0:
            return None
        if j == 2:
            return f"down_blocks.{level}.downsamplers.0.conv" if m == "0" and rest == ["op"] else None
        kind = {"0": "resnets", "1": "attentions"}.get(m)
        return None if kind is None else _inner(f"down_blocks.{level}.{kind}.{j}", rest)
    level, j = divmod(n, 3)
    if m == "0":
        return _inner(f"up_blocks.{level}.resnets.{j}", rest)
    if rest == ["conv"] and m in ("1", "2"):
        return f"up_blocks.{level}.upsamplers.0.conv"
    return _inner(f"up_blocks.{level}.attentions.{j}", rest) if m == "1" else None


def _inner(block: str, rest: list[str]) -> str:
    tail = ".".join(rest)
    if ".resnets." in block:
        for ldm, name in _RESNET.items():
            if tail == ldm or tail.startswith(ldm + "."):
                tail = name + tail[len(ldm):]
                break
    return f"{block}.{tail}" if tail else block


def _names(prefixes: tuple[str, ...], path: str) -> list[str]:
    """Every spelling of a module: kohya's (dots as underscores) and the dotted ones."""
    out = []
    for prefix in prefixes:
        out.append(prefix + path.replace(".", "_") if prefix.endswith("_") else prefix + path)
    return out


Shapes = dict[str, tuple[int, ...]]


def index(architecture: str | None, components: dict[str, tuple[str, ...]], shapes: Shapes) -> dict[str, Target]:
    """Module name (in every format) -> the key it changes, for a model of `architecture` with
    these components (canonical keys) and shapes."""
    found: dict[str, Target] = {}
    for key in components.get("unet", ()):
        if not key.endswith(".weight") or not key.startswith("model.diffusion_model."):
            continue
        path = key[len("model.diffusion_model."):-len(".weight")]
        target = Target("unet", key)
        for name in _names(("lora_unet_",), path):
            found[name] = target
        if (diffusers := diffusers_unet_path(path)) is not None:
            for name in _names(_UNET_PREFIXES, diffusers):
                found.setdefault(name, target)
    for component, (prefix, trainers) in _TEXT_ENCODERS.get(architecture or "", {}).items():
        for key in components.get(component, ()):
            if not key.startswith(prefix):
                continue
            path = key[len(prefix):]
            for name, target in _text_modules(component, key, path, shapes):
                for spelled in _names(trainers, name):
                    found[spelled] = target
    return found


def _text_modules(component: str, key: str, path: str, shapes: Shapes) -> list[tuple[str, Target]]:
    if path.startswith("text_model.") and path.endswith(".weight"):  # a transformers CLIP
        return [(path[:-len(".weight")], Target(component, key))]
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", path)  # OpenCLIP
    if not match:
        return []
    layer, module = match.groups()
    base = f"text_model.encoder.layers.{layer}."
    if module == "attn.in_proj_weight":
        width = shapes[key][1]
        return [(base + f"self_attn.{q}_proj", Target(component, key, (n * width, (n + 1) * width)))
                for n, q in enumerate("qkv")]
    if module.endswith(".weight") and module[:-len(".weight")] in _CLIP_MODULES:
        return [(base + _CLIP_MODULES[module[:-len(".weight")]], Target(component, key))]
    return []


@dataclass
class Module:
    name: str
    factors: dict[str, str] = field(default_factory=dict)  # role -> tensor name in the file
    unsupported: str | None = None


def modules(checkpoint: Checkpoint) -> tuple[dict[str, Module], list[str]]:
    """The file's modules by name, and the tensor names that belong to none."""
    found: dict[str, Module] = {}
    stray = []
    for name in checkpoint.tensors:
        processor = _PROCESSOR.search(name)
        if processor:  # unet.….attn1.processor.to_q_lora.down.weight
            module = name[:processor.start()] + "." + processor.group(1) + (".0" if processor.group(1) == "to_out" else "")
            found.setdefault(module, Module(module)).factors[processor.group(2)] = name
            continue
        suffix = next((s for s in _SUFFIXES if name.endswith("." + s)), None)
        if suffix is None:
            stray.append(name)
            continue
        module = name[:-len(suffix) - 1]
        entry = found.setdefault(module, Module(module))
        if suffix in FACTORS:
            entry.factors[FACTORS[suffix]] = name
        else:
            entry.unsupported = entry.unsupported or UNSUPPORTED[suffix]
    return found, stray


def summary(checkpoint: Checkpoint) -> dict[str, Any]:
    """What `inspect` tells of a LoRA file: its modules by kind and by the part they train."""
    found, stray = modules(checkpoint)
    kinds: dict[str, int] = {}
    parts: dict[str, int] = {}
    for module in found.values():
        roles = set(module.factors) - {"alpha"}
        kind = module.unsupported or ("lora" if "up" in roles else "loha" if "w1a" in roles else "lokr")
        kinds[kind] = kinds.get(kind, 0) + 1
        part = "unet" if module.name.startswith(("lora_unet_", "unet.")) else "text_encoder_2" if module.name.startswith(
            ("lora_te2_", "text_encoder_2.")) else "text_encoder" if module.name.startswith(("lora_te", "text_encoder.")) else "other"
        parts[part] = parts.get(part, 0) + 1
    return {"modules": len(found), "kinds": kinds, "parts": parts, "trained_for": trained_for(checkpoint, found),
            "other_tensors": len(stray)}


@dataclass(frozen=True)
class Report:
    """What the pre-flight found in one LoRA file."""

    modules: int
    matched: dict[str, int]  # component -> modules matched
    unmatched: tuple[str, ...]
    ignored: tuple[str, ...]  # tensors that belong to no module (e.g. a stored position_ids)
    kinds: dict[str, int]  # lora / loha / lokr -> modules

    def to_dict(self) -> dict[str, Any]:
        return {"modules": self.modules, "matched": self.matched, "unmatched": len(self.unmatched),
                "unmatched_examples": list(self.unmatched[:5]), "ignored": len(self.ignored), "kinds": self.kinds}


class LoraDelta:
    """A LoRA file as an input of the plan: `tensors` are the deltas of the keys it changes."""

    def __init__(self, checkpoint: Checkpoint, architecture: str | None, components: dict[str, tuple[str, ...]],
                 shapes: Shapes, dtype: str):
        self.file, self.dtype = checkpoint, dtype
        self.name, self.path, self.format = checkpoint.name, checkpoint.path, checkpoint.format
        self.version, self.size, self.mtime_ns = checkpoint.version, checkpoint.size, checkpoint.mtime_ns
        self.metadata, self.header_size = checkpoint.metadata, checkpoint.header_size
        names = index(architecture, components, shapes)
        found, stray = modules(checkpoint)
        made_for = trained_for(checkpoint, found)
        if made_for and architecture and made_for != architecture:
            raise ArchitectureError(f"a LoRA for {made_for} cannot be baked into an {architecture} model", model=self.name)
        if not found:
            raise RecipeError("holds no LoRA modules (no lora_down/lora_up, lora_A/lora_B, hada_ or lokr_ "
                              "tensors): is it a LoRA file?", model=self.name)
        self.targets: dict[str, list[tuple[Module, Target]]] = {}
        unmatched, kinds, matched = [], {}, {}
        for module in found.values():
            target = names.get(module.name)
            if target is None:
                unmatched.append(module.name)
                continue
            if module.unsupported:
                raise RecipeError(f"module {module.name} is {module.unsupported}, which is not baked: only "
                                  "LoRA/LoCon, LoHa and LoKr without Tucker factors are", model=self.name,
                                  component=target.component, key=target.key)
            kind = _kind(module, self.name, target)
            start, stop = target.rows or (0, shapes[target.key][0])
            _check_shape(module, checkpoint, kind, (stop - start, math.prod(shapes[target.key][1:])), self.name, target)
            kinds[kind] = kinds.get(kind, 0) + 1
            matched[target.component] = matched.get(target.component, 0) + 1
            self.targets.setdefault(target.key, []).append((module, target))
        if not self.targets:
            raise RecipeError(f"none of its {len(found)} modules matches this {architecture or 'model'}'s layers "
                              f"(e.g. {sorted(found)[0]}): a LoRA for another architecture?", model=self.name,
                              details={"modules": len(found), "examples": sorted(found)[:5]})
        self.report = Report(len(found), matched, tuple(sorted(unmatched)), tuple(stray), kinds)
        self.tensors = {key: TensorInfo(dtype, shapes[key]) for key in self.targets}
        changed: dict[str, list[str]] = {}
        for key, entries in self.targets.items():
            changed.setdefault(entries[0][1].component, []).append(key)
        self.info = ModelInfo(architecture, None, {c: tuple(sorted(k)) for c, k in changed.items()},
                              flags={"lora": True})
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._computing: dict[str, threading.Lock] = {}

    # -- the checkpoint interface the plan and the executor use ------------------------------------

    def read_into(self, key: str, start: int, stop: int, staging: Any) -> Any:
        return self.delta(key).reshape(-1)[start:stop]

    def pread_into(self, key: str, start: int, stop: int, staging: Any) -> Any:
        return self.read_into(key, start, stop, staging)

    def address_of(self, key: str, start: int, stop: int, staging: Any) -> int:
        """Copied into `staging`: the cached delta may be dropped while a kernel reads it."""
        size = ITEMSIZE[self.dtype]
        chunk = self.delta(key).reshape(-1)[start:stop]
        staging.view[:(stop - start) * size] = memoryview(chunk.numpy()).cast("B")
        return staging.address

    def read_bytes(self, key: str) -> bytes:
        return self.delta(key).numpy().tobytes()

    def fileno(self) -> int | None:
        return self.file.fileno()

    def check_intact(self, key: str | None = None) -> None:
        self.file.check_intact()

    def check_unchanged(self) -> None:
        self.file.check_unchanged()

    def release(self) -> None:
        self.file.release()

    def close(self) -> None:
        self._cache.clear()
        self.file.close()

    # -- computing deltas ------------------------------------------------------------------------

    def delta(self, key: str) -> Any:
        """The key's delta, the scale applied (factors widened to the delta's dtype first)."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            guard = self._computing.setdefault(key, threading.Lock())
        with guard:
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            value = self._compute(key)
            with self._lock:
                self._cache[key] = value
                self._cached_bytes += value.numel() * value.element_size()
                while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cached_bytes -= old.numel() * old.element_size()
                self._computing.pop(key, None)
            return value

    def _compute(self, key: str) -> Any:
        import torch

        from .checkpoint import torch_dtype

        dtype, shape = torch_dtype(self.dtype), self.tensors[key].shape
        out = torch.zeros(shape, dtype=dtype)
        rows = out.reshape(shape[0], -1)
        for module, target in self.targets[key]:
            factor = {role: self.file.read_tensor(name).to(dtype) for role, name in module.factors.items()}
            start, stop = target.rows or (0, shape[0])
            want = (stop - start, rows.shape[1])
            delta = _delta(factor, want, module.name, self.name, target)
            rows[start:stop] += delta
        self.file.check_intact()
        if not bool(torch.isfinite(out).all()):
            raise RecipeError("its factors give NaN or Inf", model=self.name, component=self.targets[key][0][1].component,
                              key=key)
        return out


_TRAINED_FOR = (("ss_base_model_version", (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"))),
                ("modelspec.architecture", (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v1", "sd1"),
                                            ("stable-diffusion-v2", "sd2"))))


def trained_for(checkpoint: Checkpoint, found: dict[str, Module]) -> str | None:
    """The architecture the LoRA says it was trained for (kohya's and ModelSpec's metadata), or
    that its names give away (two text encoders are SDXL's); None where nothing tells."""
    for field_name, prefixes in _TRAINED_FOR:
        value = checkpoint.metadata.get(field_name, "")
        for prefix, architecture in prefixes:
            if value.startswith(prefix):
                return architecture
    if any(name.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for name in found):
        return "sdxl"
    return None


def _check_shape(module: Module, checkpoint: Checkpoint, kind: str, want: tuple[int, int], file: str,
                 target: Target) -> None:
    """The delta's shape from the factors' shapes in the header: a LoRA for other layers fails here,
    at planning, before anything is read."""
    shape = {role: checkpoint.tensors[name].shape for role, name in module.factors.items()}

    def flat(s: tuple[int, ...]) -> tuple[int, int]:
        return (s[0], math.prod(s[1:])) if s else (1, 1)

    if kind == "lora":
        (rows, inner), (rank, cols) = flat(shape["up"]), flat(shape["down"])
        ok = inner == rank
    elif kind == "loha":
        a1, b1, a2, b2 = (flat(shape[r]) for r in ("w1a", "w1b", "w2a", "w2b"))
        ok = a1[1] == b1[0] and a2[1] == b2[0] and (a1[0], b1[1]) == (a2[0], b2[1])
        rows, cols = a1[0], b1[1]
    else:
        w1 = flat(shape["k1"]) if "k1" in shape else (flat(shape["k1a"])[0], flat(shape["k1b"])[1])
        w2 = flat(shape["k2"]) if "k2" in shape else (flat(shape["k2a"])[0], flat(shape["k2b"])[1])
        ok = all(flat(shape[a])[1] == flat(shape[b])[0] for a, b in (("k1a", "k1b"), ("k2a", "k2b")) if a in shape)
        rows, cols = w1[0] * w2[0], w1[1] * w2[1]
    if not ok:
        raise LayoutMismatchError(f"module {module.name}'s factors do not multiply ({ {r: list(s) for r, s in shape.items()} })",
                                  model=file, component=target.component, key=target.key)
    if (rows, cols) != want:
        raise LayoutMismatchError(f"module {module.name} gives a delta of {[rows, cols]} where the model's weight "
                                  f"is {list(want)}: a LoRA for another architecture?", model=file,
                                  component=target.component, key=target.key)


def _kind(module: Module, file: str, target: Target) -> str:
    roles = set(module.factors) - {"alpha"}
    if roles == {"up", "down"}:
        return "lora"
    if roles == {"w1a", "w1b", "w2a", "w2b"}:
        return "loha"
    if roles and roles <= {"k1", "k1a", "k1b", "k2", "k2a", "k2b"} and (
            ("k1" in roles) != ({"k1a", "k1b"} <= roles)) and (("k2" in roles) != ({"k2a", "k2b"} <= roles)):
        return "lokr"
    raise RecipeError(f"module {module.name} has the tensors {sorted(roles)}, which make no LoRA, LoHa or LoKr",
                      model=file, component=target.component, key=target.key)


def _delta(f: dict[str, Any], want: tuple[int, int], module: str, file: str, target: Target) -> Any:
    """The module's delta as a (rows, columns) matrix, scaled."""
    import torch

    def flat(t: Any) -> Any:
        return t.reshape(t.shape[0], -1)

    if "up" in f:
        rank = f["down"].shape[0]
        delta = flat(f["up"]) @ flat(f["down"])
    elif "w1a" in f:
        rank = f["w1b"].shape[0]
        delta = (flat(f["w1a"]) @ flat(f["w1b"])) * (flat(f["w2a"]) @ flat(f["w2b"]))
    else:
        w1 = f["k1"] if "k1" in f else flat(f["k1a"]) @ flat(f["k1b"])
        w2 = f["k2"] if "k2" in f else flat(f["k2a"]) @ flat(f["k2b"])
        rank = f["k2b"].shape[0] if "k2b" in f else f["k1b"].shape[0] if "k1b" in f else None
        if w2.dim() == 4:
            w1 = w1.reshape(*w1.shape[:2], 1, 1)
        delta = flat(torch.kron(w1, w2))
    if tuple(delta.shape) != want and delta.numel() == want[0] * want[1] and delta.shape[0] == want[0]:
        delta = delta.reshape(want)  # a 1x1 convolution trained as a linear layer, or back
    if tuple(delta.shape) != want:
        raise LayoutMismatchError(f"module {module} gives a delta of {list(delta.shape)} where the model's weight "
                                  f"is {list(want)}: a LoRA for another architecture?", model=file,
                                  component=target.component, key=target.key)
    alpha = f.get("alpha")
    if alpha is not None and rank:
        delta = delta * (float(alpha.reshape(-1)[0]) / rank)
    return delta
