"""Planning: a recipe resolved against real file headers, checked before any weight is read.

`plan()` opens headers only. It resolves every model reference, detects architectures and
components, flattens each component's source tree into exact leaf coefficients, checks that
the sources of every component agree on keys, shapes and kinds, and lays out the output file
(header bytes, every tensor's offset). Every problem is a typed error naming the model, the
component and the key; a plan that comes back is one the executor can run to the end.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from . import __version__, labels
from .architecture import ModelInfo, check_compatible, detect, native_dtype
from .checkpoint import ITEMSIZE, Checkpoint, FileVersion, open_checkpoint
from .errors import (
    ArchitectureError,
    InputChangedError,
    LayoutMismatchError,
    RecipeError,
    ResolveError,
)
from .hashing import hash_fd, hash_version
from .jsonsafe import try_loads
from .lora import LoraDelta
from .methods import LoraLeaf
from .recipe import (
    COMPONENTS,
    Leaf,
    ModelLeaf,
    Recipe,
    all_leaves,
    canonical_json,
    rewrite_leaves,
)
from .sources import Apply, ComponentSource, Sum

__all__ = ["Apply", "KeyPlan", "Plan", "PlannedInput", "ResolvedModel", "Resolver", "Sum", "Term", "plan"]

OUTPUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "fp8_e4m3fn": "F8_E4M3", "fp8_e5m2": "F8_E5M2"}
STANDALONE_VAE_PREFIX = "first_stage_model."  # a VAE written alone drops it, as models/VAE files do
OPTIONAL_KEYS = ("position_ids",)  # files written by transformers >= 4.31 lack it
EMA_PREFIX = "model_ema."
MAX_CARRIED_LINEAGE = 4 << 20  # an input's recorded lineage bigger than this is not carried forward


@dataclass(frozen=True)
class ResolvedModel:
    """Where a recipe leaf lives. Hashes are optional: the registry knows them, the CLI computes
    them. Given hashes come with the version of the file they were computed from (as much of it
    as the registry recorded): a file found in another version is refused, not trusted."""

    path: Path
    name: str
    sha256: str | None = None
    legacy: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    inode: int | None = None
    ctime_ns: int | None = None

    def changes(self, version: FileVersion) -> list[str]:
        """What differs between the hashed version and `version` (only what was recorded)."""
        known = {"size": self.size, "mtime_ns": self.mtime_ns, "inode": self.inode, "ctime_ns": self.ctime_ns}
        return [name for name, value in known.items() if value is not None and getattr(version, name) != value]


Resolver = Callable[[Leaf], ResolvedModel]


@dataclass(frozen=True)
class PlannedInput:
    label: str
    path: Path
    name: str
    sha256: str
    legacy: str
    checkpoint: Checkpoint = field(repr=False)
    info: ModelInfo = field(repr=False)


@dataclass(frozen=True)
class Term:
    input: int
    key: str  # the key as stored in that input's file
    coefficient: float


@dataclass(frozen=True)
class KeyPlan:
    key: str
    component: str  # a component name, or "other"
    dtype: str
    shape: tuple[int, ...]
    kind: str  # "float" (weighted sum, rounded once) or "integer" (copied, must agree)
    terms: tuple[Term, ...]  # the weighted sum; for a non-linear key, each input it reads (coefficient 0)
    offset: int = 0  # from the start of the data section
    expression: Sum | None = None  # set where the key is not one weighted sum of its inputs

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    canonical_recipe: Recipe
    recipe_hash: str
    architecture: str | None
    variant: str | None
    inputs: tuple[PlannedInput, ...]
    components: dict[str, tuple[tuple[int, Fraction], ...]]  # weight 0 for a non-linear component's inputs
    keys: tuple[KeyPlan, ...]
    metadata: dict[str, str]
    header: bytes
    warnings: tuple[str, ...]
    expressions: dict[str, Sum] = field(default_factory=dict)  # the non-linear components' evaluation
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)  # components whose weights vary per block
    hash_slot: int | None = None  # where the header reserves modelspec.hash_sha256's digits (labels.py)

    @property
    def output_size(self) -> int:
        return len(self.header) + sum(k.nbytes for k in self.keys)

    @property
    def bytes_to_read(self) -> int:
        return sum(
            self.inputs[t.input].checkpoint.tensors[t.key].nbytes for k in self.keys for t in k.terms
        )

    def sealed_metadata(self, autov3: str | None) -> dict[str, str]:
        """The metadata as written, the reserved hash filled in."""
        if self.hash_slot is None or autov3 is None:
            return self.metadata
        return {**self.metadata, labels.HASH_KEY: "0x" + autov3}

    def close(self) -> None:
        for item in self.inputs:
            item.checkpoint.close()

    def to_dict(self) -> dict[str, Any]:
        per_component: dict[str, dict[str, Any]] = {}
        for component, terms in self.components.items():
            keys = [k for k in self.keys if k.component == component]
            expression = self.expressions.get(component)
            per_key = expression is not None or component in self.blocks
            per_component[component] = {
                "sources": [
                    {"model": self.inputs[i].name, "sha256": self.inputs[i].sha256,
                     **({} if per_key else {"weight": float(c), "exact_weight": str(c)})}
                    for i, c in terms
                ],
                "keys": len(keys),
                "params": sum(k.numel for k in keys if k.kind == "float"),
                **({"evaluation": expression.describe()} if expression else {}),
                **({"blocks": self.blocks[component]} if component in self.blocks else {}),
            }
        return {
            "name": self.recipe.name,
            "architecture": self.architecture,
            "variant": self.variant,
            "recipe_hash": self.recipe_hash,
            "inputs": [
                {"name": i.name, "path": str(i.path), "sha256": i.sha256, "label": i.label,
                 "architecture": i.info.architecture, "size": i.checkpoint.size}
                for i in self.inputs
            ],
            "components": per_component,
            "other_keys": sum(1 for k in self.keys if k.component == "other"),
            "output": {"keys": len(self.keys), "bytes": self.output_size, "dtype": self.recipe.output.dtype,
                       "accumulate": self.recipe.output.accumulate,
                       **({"component_dtypes": self.recipe.output.component_dtypes}
                          if self.recipe.output.component_dtypes else {}),
                       **({"components": self.recipe.output.components} if self.recipe.output.components else {})},
            "bytes_to_read": self.bytes_to_read,
            "modelspec": {k.removeprefix("modelspec."): v for k, v in self.metadata.items()
                          if k.startswith("modelspec.") and k != labels.HASH_KEY},
            **({"loras": {i.name: i.checkpoint.report.to_dict() for i in self.inputs if isinstance(i.checkpoint, LoraDelta)}}
               if any(isinstance(i.checkpoint, LoraDelta) for i in self.inputs) else {}),
            "warnings": list(self.warnings),
        }


def plan(recipe: Recipe, resolver: Resolver) -> Plan:
    inputs, index_of = _open_inputs(recipe, resolver)
    try:
        return _plan(recipe, inputs, index_of)
    except BaseException:
        for item in inputs:
            item.checkpoint.close()
        raise


def _open_inputs(recipe: Recipe, resolver: Resolver) -> tuple[list[PlannedInput], dict[Hashable, int]]:
    """Every leaf opened once per file: checkpoints first, then LoRA files, read as the deltas
    they add to the checkpoints' keys (so their architecture is known first)."""
    inputs: list[PlannedInput] = []
    by_path: dict[tuple[Path, bool], int] = {}
    index_of: dict[Hashable, int] = {}
    leaves = all_leaves(recipe)
    try:
        for leaf in [*(x for x in leaves if not isinstance(x, LoraLeaf)), *(x for x in leaves if isinstance(x, LoraLeaf))]:
            ref = leaf.ref if isinstance(leaf, LoraLeaf) else leaf
            resolved = resolver(ref)
            real = resolved.path.resolve()
            if (real, isinstance(leaf, LoraLeaf)) not in by_path:
                if (real, not isinstance(leaf, LoraLeaf)) in by_path:
                    raise ResolveError("the recipe takes this file both as a checkpoint and as a LoRA",
                                       model=resolved.name)
                checkpoint = open_checkpoint(real, name=resolved.name)
                by_path[real, isinstance(leaf, LoraLeaf)] = len(inputs)
                label = ref.label() if isinstance(ref, ModelLeaf) else ref
                sha256, legacy = _hashes(checkpoint, resolved)
                if isinstance(leaf, LoraLeaf):
                    checkpoint = _lora_delta(checkpoint, inputs, recipe)
                inputs.append(PlannedInput(label, real, resolved.name, sha256, legacy, checkpoint, _detect(checkpoint)))
            found = inputs[by_path[real, isinstance(leaf, LoraLeaf)]]
            if isinstance(ref, ModelLeaf) and ref.sha256 and ref.sha256 != found.sha256:
                raise ResolveError(
                    f"file {found.path.name} has sha256 {found.sha256[:10]}…, the recipe asks for {ref.sha256[:10]}…",
                    model=ref.label(),
                )
            index_of[leaf] = by_path[real, isinstance(leaf, LoraLeaf)]
    except BaseException:
        for item in inputs:
            item.checkpoint.close()
        raise
    return inputs, index_of


def _hashes(checkpoint: Checkpoint, resolved: ResolvedModel) -> tuple[str, str]:
    """The hashes of the very file version that was opened: computed from its descriptor, or the
    given ones if they were computed from this version."""
    if resolved.sha256 is not None and resolved.legacy is not None:
        if changes := resolved.changes(checkpoint.version):
            raise InputChangedError(f"the file changed since it was hashed ({', '.join(changes)} differ); "
                                    "it must be hashed again", model=resolved.name,
                                    details={"path": str(checkpoint.path)})
        return resolved.sha256, resolved.legacy
    if checkpoint.fileno() is not None:
        hashes, version = hash_fd(checkpoint.fileno(), checkpoint.path)
    else:
        hashes, version = hash_version(checkpoint.path)
    if version != checkpoint.version:
        raise InputChangedError(f"the file changed while it was planned ({', '.join(checkpoint.version.differences(version))})",
                                model=resolved.name, details={"path": str(checkpoint.path)})
    return hashes.sha256, hashes.legacy


def _lora_delta(checkpoint: Checkpoint, inputs: list[PlannedInput], recipe: Recipe) -> LoraDelta:
    """A LoRA file as deltas on the keys of the recipe's checkpoints (their components and shapes)."""
    try:
        models = [i for i in inputs if not i.info.flags.get("lora")]
        architecture = _common_architecture(models)
        components: dict[str, tuple[str, ...]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for item in models:
            for component, keys in item.info.components.items():
                components.setdefault(component, keys)
                for key in keys:
                    shapes.setdefault(key, item.checkpoint.tensors[item.info.key_map.get(key, key)].shape)
        dtype = "F64" if recipe.output.accumulate == "fp64" else "F32"
        return LoraDelta(checkpoint, architecture, components, shapes, dtype)
    except BaseException:
        checkpoint.close()
        raise


def _is_lora(item: PlannedInput) -> bool:
    return bool(item.info.flags.get("lora"))


_DETECTED: dict[tuple[FileVersion, str], ModelInfo] = {}
DETECTED_CACHE_FILES = 64  # each holds a file's key lists: a few hundred KB for SDXL


def _detect(checkpoint: Checkpoint) -> ModelInfo:
    """Detection once per file version: the service plans the same files again and again."""
    if isinstance(checkpoint, LoraDelta):
        return checkpoint.info
    version = (checkpoint.version, checkpoint.name)
    info = _DETECTED.get(version)
    if info is None:
        info = detect(checkpoint.tensors, model=checkpoint.name)
        if len(_DETECTED) >= DETECTED_CACHE_FILES:
            _DETECTED.pop(next(iter(_DETECTED)), None)
        _DETECTED[version] = info
    return info


def _plan(recipe: Recipe, inputs: list[PlannedInput], index_of: dict[Hashable, int]) -> Plan:
    warnings: list[str] = []
    architecture = _common_architecture(inputs)
    merge_source = ComponentSource(recipe.merge, index_of, "merge", architecture)
    components: dict[str, tuple[tuple[int, Fraction], ...]] = {}
    expressions: dict[str, Sum] = {}
    blocks: dict[str, dict[str, Any]] = {}
    keys: list[KeyPlan] = []
    variant = None
    written = recipe.output.components
    for component in COMPONENTS:
        if written is not None and component not in written:
            continue
        named = component in recipe.components
        source = ComponentSource(recipe.components[component], index_of, f"components.{component}",
                                 architecture) if named else merge_source
        terms = source.inputs
        have = [i for i, _ in terms if component in inputs[i].info.components and not _is_lora(inputs[i])]
        if not have and not named:
            continue  # no source of the default merge has this component: the output lacks it too
        for i, _ in terms:
            if component not in inputs[i].info.components and not _is_lora(inputs[i]):
                raise LayoutMismatchError(
                    f"model has no {component} but the recipe takes {component} from it",
                    model=inputs[i].name, component=component,
                )
        terms = tuple((i, c) for i, c in terms if component in inputs[i].info.components or not _is_lora(inputs[i]))
        warnings += check_compatible([(inputs[i].name, inputs[i].info) for i, _ in terms if not _is_lora(inputs[i])],
                                     component)
        if component == "unet":
            variant = inputs[terms[0][0]].info.variant
        components[component] = terms
        if source.expression is not None:
            expressions[component] = source.expression
        keys += _component_keys(recipe, architecture, component, inputs, source, terms)
        if source.varies:
            blocks[component] = source.describe(component, [i.name for i in inputs])
    if written is not None and (missing := [c for c in written if c not in components]):
        raise LayoutMismatchError(f"output.components asks for {missing[0]}, which no source of the merge has",
                                  component=missing[0])
    first = merge_source.inputs[0][0]
    taken = {k.key for k in keys}
    for key in inputs[first].info.other if written is None or "unet" in written else ():
        if key in taken:
            continue
        file_key = inputs[first].info.key_map.get(key, key)
        info = inputs[first].checkpoint.tensors[file_key]
        dtype = native_dtype(architecture, key) if info.is_float else info.dtype
        keys.append(KeyPlan(key, "other", dtype or info.dtype, info.shape,
                            "float" if info.is_float else "integer", (Term(first, file_key, 1.0),)))
    keep_ema = recipe.output.ema == "keep" and "unet" in components
    if keep_ema:
        keys += _ema_keys(keys, components["unet"], inputs)
    elif recipe.output.ema == "keep":
        warnings.append("output.ema is keep but the output has no UNet: there is no EMA to keep")
    keys = _drop_keys(recipe, keys, warnings)
    if written == ["vae"]:
        keys = [replace(k, key=k.key.removeprefix(STANDALONE_VAE_PREFIX)) for k in keys]
    dropped = 0 if keep_ema else sum(len(inputs[i].info.ema) for i, _ in merge_source.inputs) \
        if written is None or "unet" in written else 0
    if dropped:
        warnings.append(f"{dropped} EMA tensors (model_ema.*) are not carried into the merge")
    for item in inputs:
        warnings += [f"{item.name}: {w}" for w in item.info.warnings]
        if isinstance(item.checkpoint, LoraDelta) and (unmatched := item.checkpoint.report.unmatched):
            warnings.append(f"{item.name}: {len(unmatched)} of its {item.checkpoint.report.modules} LoRA modules "
                            f"match no layer of this model and are not baked (e.g. {unmatched[0]})")
    keys = _lay_out(sorted(keys, key=lambda k: k.key))
    canonical = rewrite_leaves(
        recipe, lambda leaf: {"sha256": inputs[index_of[leaf]].sha256, "name": inputs[index_of[leaf]].path.name}
    )
    recipe_hash = canonical.recipe_hash()
    spec: dict[str, str] = {}
    if recipe.output.modelspec:
        merged = [i for i in inputs if not _is_lora(i)]
        spec, notes = labels.modelspec(
            architecture=architecture, variant=variant, components=components,
            title=recipe.name or f"sdmerge {recipe_hash[:10]}", given=recipe.output.metadata,
            inputs=[(i.path.name, i.checkpoint.metadata) for i in merged])
        warnings += notes
    metadata = _metadata(canonical, recipe_hash, inputs, spec)
    header = _header(metadata, keys)
    return Plan(recipe, canonical, recipe_hash, architecture, variant, tuple(inputs), components,
                tuple(keys), metadata, header, tuple(dict.fromkeys(warnings)), expressions,
                blocks, labels.hash_slot(header))


def _ema_keys(keys: list[KeyPlan], unet: tuple[tuple[int, Fraction], ...], inputs: list[PlannedInput]) -> list[KeyPlan]:
    """Kept EMA weights, merged as the UNet is: each `model_ema.` copy of a UNet tensor (LitEma's
    names: the key after `model.` with its dots removed) takes that tensor's sum or evaluation,
    read from each source's EMA copy. EMA bookkeeping (decay, num_updates) is the first source's."""
    sources = [i for i, _ in unet]
    for i in sources:
        if _is_lora(inputs[i]):
            raise RecipeError("output.ema keep cannot be combined with a LoRA baked into the UNet: a LoRA has no "
                              "EMA weights", model=inputs[i].name, component="unet")
        if not inputs[i].info.ema:
            raise LayoutMismatchError("output.ema is keep but this model has no EMA weights (model_ema.*)",
                                      model=inputs[i].name, component="unet")
    by_ema_name = {EMA_PREFIX + k.key.removeprefix("model.").replace(".", ""): k for k in keys if k.component == "unet"}
    first = inputs[sources[0]]
    out = []
    for ema_key in first.info.ema:
        info = first.checkpoint.tensors[ema_key]
        for i in sources[1:]:
            theirs = inputs[i].checkpoint.tensors.get(ema_key)
            if theirs is None:
                raise LayoutMismatchError("EMA key missing here but present in the other sources",
                                          model=inputs[i].name, component="unet", key=ema_key)
            if theirs.shape != info.shape:
                raise LayoutMismatchError(f"EMA shape {list(theirs.shape)} differs from {list(info.shape)} in "
                                          f"{first.name}", model=inputs[i].name, component="unet", key=ema_key)
        base = by_ema_name.get(ema_key)
        if base is None:  # decay, num_updates: not weights
            out.append(KeyPlan(ema_key, "unet", info.dtype, info.shape, "float" if info.is_float else "integer",
                               (Term(sources[0], ema_key, 1.0),)))
        elif base.shape != info.shape:
            raise LayoutMismatchError(f"EMA shape {list(info.shape)} differs from the UNet's {list(base.shape)}",
                                      model=first.name, component="unet", key=ema_key)
        else:
            terms = tuple(Term(t.input, ema_key, t.coefficient) for t in base.terms)
            out.append(KeyPlan(ema_key, "unet", base.dtype, base.shape, base.kind, terms, 0, base.expression))
    return out


def _drop_keys(recipe: Recipe, keys: list[KeyPlan], warnings: list[str]) -> list[KeyPlan]:
    """The keys no `output.drop_keys` pattern matches; a pattern that matches nothing is a warning."""
    patterns = [re.compile(p) for p in recipe.output.drop_keys]
    if not patterns:
        return keys
    matched = [0] * len(patterns)
    kept = []
    for k in keys:
        hits = [n for n, p in enumerate(patterns) if p.search(k.key)]
        for n in hits:
            matched[n] += 1
        if not hits:
            kept.append(k)
    for pattern, count in zip(recipe.output.drop_keys, matched, strict=True):
        warnings.append(f"drop_keys {pattern!r} matched no key" if not count else f"drop_keys {pattern!r}: {count} keys not written")
    if not kept:
        raise RecipeError("output.drop_keys drops every key: the output would be empty")
    return kept


def _common_architecture(inputs: list[PlannedInput]) -> str | None:
    known = [(i.name, i.info.architecture) for i in inputs if i.info.architecture]
    for name, arch in known[1:]:
        if arch != known[0][1]:
            raise ArchitectureError(
                f"cannot merge {known[0][1]} model {known[0][0]!r} with {arch} model {name!r}", model=name
            )
    return known[0][1] if known else None


def _component_keys(recipe: Recipe, architecture: str | None, component: str,
                    inputs: list[PlannedInput], source: ComponentSource,
                    terms: tuple[tuple[int, Fraction], ...]) -> list[KeyPlan]:
    """Every key of the component, checked across its sources. A LoRA's deltas cover some keys
    only: they are checked against the model's keys, and the other keys are the model's own."""
    loras = [(i, c) for i, c in source.inputs if _is_lora(inputs[i])]
    terms = tuple((i, c) for i, c in terms if not _is_lora(inputs[i]))
    ref = inputs[terms[0][0]]
    ref_keys = set(ref.info.components[component])
    for i, _ in loras:
        if extra := sorted(set(inputs[i].info.components.get(component, ())) - ref_keys):
            raise LayoutMismatchError("LoRA changes a key the model lacks", model=inputs[i].name,
                                      component=component, key=extra[0])
    for i, _ in terms[1:]:
        other = inputs[i]
        theirs = set(other.info.components[component])
        for missing, holder in ((ref_keys - theirs, other), (theirs - ref_keys, ref)):
            missing = {k for k in missing if not k.endswith(OPTIONAL_KEYS)}
            if missing:
                raise LayoutMismatchError(
                    f"key missing here but present in the other sources ({len(missing)} keys differ)",
                    model=holder.name, component=component, key=sorted(missing)[0],
                )
    out_dtype = OUTPUT_DTYPES[recipe.output.component_dtypes.get(component, recipe.output.dtype)]
    plans = []
    for key in sorted(ref_keys | {k for i, _ in terms for k in inputs[i].info.components[component]}):
        present = [(i, c) for i, c in terms if key in inputs[i].info.components[component]]
        present += [(i, c) for i, c in loras if key in inputs[i].info.components.get(component, ())]
        infos = [(i, c, inputs[i].info.key_map.get(key, key)) for i, c in present]
        first = inputs[infos[0][0]].checkpoint.tensors[infos[0][2]]
        for i, _, file_key in infos[1:]:
            info = inputs[i].checkpoint.tensors[file_key]
            if info.shape != first.shape:
                raise LayoutMismatchError(
                    f"shape {list(info.shape)} differs from {list(first.shape)} in {inputs[infos[0][0]].name}",
                    model=inputs[i].name, component=component, key=key,
                )
            if info.is_float != first.is_float:
                raise LayoutMismatchError(
                    f"dtype {info.dtype} cannot be merged with {first.dtype} in {inputs[infos[0][0]].name}",
                    model=inputs[i].name, component=component, key=key,
                )
        if first.is_float:
            dtype = native_dtype(architecture, key) or out_dtype
            evaluation = source.at(component, key)  # the same object for every key unless blocks differ
            expression, weight = evaluation.expression, evaluation.weights
            terms_out = tuple(Term(i, fk, weight[i]) for i, _, fk in infos if i in weight)
            if expression is not None:
                have = {j for j, _, _ in infos}
                if missing := [i for i, _ in terms if i not in have]:
                    raise LayoutMismatchError("key missing here but present in the other sources of a non-linear "
                                              "method", model=inputs[missing[0]].name, component=component, key=key)
                if absent := frozenset(i for i, _ in loras if i not in have):
                    expression = _without(expression, absent)  # a LoRA that leaves this key as it is
            plans.append(KeyPlan(key, component, dtype, first.shape, "float", terms_out, 0, expression))
        else:  # integers are copied, never averaged; every source must agree
            plans.append(KeyPlan(key, component, first.dtype, first.shape, "integer",
                                 tuple(Term(i, fk, 1.0) for i, _, fk in infos)))
    return plans


def _without(total: Sum, absent: frozenset[int]) -> Sum:
    """The evaluation with the parts reading `absent` inputs (LoRA deltas of other keys) left out."""
    def inner(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(_without(v, absent) for v in value)
        return None if value is None else _without(value, absent)
    parts = []
    for part, c in total.parts:
        if isinstance(part, Apply):
            parts.append((Apply(part.method, part.params, tuple((n, inner(v)) for n, v in part.inputs)), c))
        elif part not in absent:
            parts.append((part, c))
    return Sum(tuple(parts))


def _lay_out(keys: list[KeyPlan]) -> list[KeyPlan]:
    out, offset = [], 0
    for k in keys:
        out.append(KeyPlan(k.key, k.component, k.dtype, k.shape, k.kind, k.terms, offset, k.expression))
        offset += k.nbytes
    return out


def _metadata(canonical: Recipe, recipe_hash: str, inputs: list[PlannedInput],
              spec: dict[str, str]) -> dict[str, str]:
    """Provenance: our canonical recipe, A1111's two keys so the WebUI shows the lineage, and the
    ModelSpec labels (labels.py) other tools read."""
    models: dict[str, Any] = {}
    for item in inputs:  # like the WebUI, carry the inputs' own lineage forward (if it is readable)
        lineage = item.checkpoint.metadata.get("sd_merge_models", "")
        if len(lineage) <= MAX_CARRIED_LINEAGE and isinstance(found := try_loads(lineage), dict):
            models.update(found)
    for item in inputs:
        own = item.checkpoint.metadata.get("sd_merge_recipe", "")
        own_recipe = try_loads(own) if len(own) <= MAX_CARRIED_LINEAGE else None
        models[item.sha256] = {"name": item.path.name, "legacy_hash": item.legacy,
                               "sd_merge_recipe": own_recipe}
    a1111_recipe = {
        "type": "sdmerge",
        "custom_name": canonical.name,
        "save_as_half": canonical.output.dtype == "fp16",
        "recipe": canonical.model_dump(mode="json"),
    }
    return {
        **canonical.output.metadata,
        **spec,
        "format": "pt",
        "sdmerge_version": __version__,
        "sdmerge_recipe": canonical.canonical_json(),
        "sdmerge_recipe_hash": recipe_hash,
        "sdmerge_inputs": canonical_json([{"sha256": i.sha256, "name": i.path.name} for i in inputs]),
        "sd_merge_recipe": canonical_json(a1111_recipe),
        "sd_merge_models": canonical_json(models),
    }


def _header(metadata: dict[str, str], keys: list[KeyPlan]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": metadata}
    for k in keys:
        entries[k.key] = {"dtype": k.dtype, "shape": list(k.shape), "data_offsets": [k.offset, k.offset + k.nbytes]}
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section to 8 bytes
    return len(text).to_bytes(8, "little") + text
