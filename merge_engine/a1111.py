"""A1111 Checkpoint Merger metadata -> a native recipe with exact leaf weights.

A1111 writes `sd_merge_recipe` (the last merge) and `sd_merge_models` (sha256 -> {name,
legacy_hash, sd_merge_recipe}); each merge copies its inputs' `sd_merge_models` into its own,
so one file holds the whole lineage.

Which models are leaves: flattening a webui merge reproduces its output, so a model's recipe is
expanded when the file is that merge's untouched output, i.e. it still has the name A1111 gave
it (custom_name or the generated name). A renamed file (a downloaded or curated checkpoint that
carries its author's history) stays a leaf, with a note. `expand="all"` expands every recipe,
`expand="none"` only the top one.

Errors, never guesses: a null hash where a model is needed (A1111 writes the recipe before
hashing an unhashed input); a hash with no `sd_merge_models` entry (A1111 records every input it
names, so the metadata was edited); non-webui node types, unknown interp_method or recipe keys;
cycles; `discard_weights` (dropping keys has no native form); a VAE baked in below the top
merge. A VAE baked into the top merge becomes the `vae` component, known by file name.
`is_inpainting` / `is_instruct_pix2pix` are warnings: the plan refuses to mix those UNet
variants with plain ones, which A1111 did channel by channel.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from . import jsonsafe
from .errors import CheckpointError, RecipeError
from .recipe import ModelLeaf, Recipe, parse_recipe, rewrite_leaves

Expand = Literal["lineage", "all", "none"]
RECIPE_KEYS = frozenset({
    "type", "primary_model_hash", "secondary_model_hash", "tertiary_model_hash", "interp_method",
    "multiplier", "save_as_half", "custom_name", "config_source", "bake_in_vae", "discard_weights",
    "is_inpainting", "is_instruct_pix2pix",
})
HASH_FIELDS = ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash")
# interp_method -> the weight of A, B, C as functions of the multiplier M
METHOD_WEIGHTS: dict[str, tuple[Callable[[Fraction], Fraction], ...]] = {
    "Weighted sum": (lambda m: 1 - m, lambda m: m),
    "Add difference": (lambda m: Fraction(1), lambda m: m, lambda m: -m),
    "No interpolation": (lambda m: Fraction(1),),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{10,64}")
_MAX_HEADER = 100 * 1024 * 1024
MAX_LINEAGE_DEPTH = 256  # merges of merges; the recursion below takes a few frames per level
MAX_LINEAGE_MODELS = 10_000


@dataclass(frozen=True)
class LeafWeight:
    sha256: str | None
    name: str | None
    weight: Fraction

    def label(self) -> str:
        return self.name or f"sha256:{self.sha256}"


@dataclass(frozen=True)
class A1111Conversion:
    recipe: Recipe
    leaves: tuple[LeafWeight, ...]
    warnings: tuple[str, ...] = ()
    tree: dict[str, Any] | None = None
    vae: LeafWeight | None = None  # a VAE baked into the top merge, known by file name only


def _decode(value: Any, what: str, model: str | None = None) -> Any:
    """A1111 stores both keys as JSON strings in safetensors metadata; dumps may hold objects."""
    if isinstance(value, str | bytes):
        return jsonsafe.loads(value, what=what, error=RecipeError, model=model)
    jsonsafe.check_depth(value, what=what, error=RecipeError, model=model)
    return value


def _inner(data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    inner = data.get("__metadata__", data)
    if isinstance(inner, Mapping) and isinstance(inner.get("sd_merge_recipe"), Mapping | str):
        return inner
    return None


def is_a1111_metadata(data: Mapping[str, Any]) -> bool:
    return isinstance(data, Mapping) and _inner(data) is not None


def load_a1111_metadata(path: str | Path) -> dict[str, Any]:
    """The bare metadata mapping, both keys decoded, from a JSON dump or a .safetensors header."""
    path = Path(path)
    whole = jsonsafe.read_file(path, "metadata file", _MAX_HEADER + 8, RecipeError, prefix=True)  # a FIFO is refused
    length = int.from_bytes(whole[:8], "little") if len(whole) >= 8 else -1
    # A safetensors file is a length then a JSON header; JSON text read as a length is huge.
    is_header = 0 < length <= min(len(whole) - 8, _MAX_HEADER) and whole[8:9] == b"{"
    raw = whole[8:8 + length] if is_header else whole
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if is_header:
        data = jsonsafe.loads(text or raw, what=f"the safetensors header of {path.name}", error=CheckpointError,
                              model=str(path))
    else:
        data = jsonsafe.loads(text or raw, what=f"{path.name} (neither a JSON dump nor a .safetensors file)",
                              error=RecipeError, model=str(path))
    inner = _inner(data) if isinstance(data, Mapping) else None
    if inner is None:
        raise RecipeError(f"{path.name} holds no A1111 merge metadata (sd_merge_recipe)", model=str(path))
    decoded = dict(inner)
    for key in ("sd_merge_recipe", "sd_merge_models"):
        if key in decoded:
            decoded[key] = _decode(decoded[key], key, str(path))
    return decoded


def _base_name(name: str) -> str:
    """A1111 model names are paths relative to its models folder, sub-folder included."""
    return re.split(r"[/\\]", name)[-1]


def _stem(name: str) -> str:
    base = _base_name(name)
    return base.rsplit(".", 1)[0] if "." in base else base


def _multiplier(recipe: Mapping[str, Any], label: str) -> Fraction:
    value = recipe.get("multiplier")
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        # via str, so 0.1 stays the decimal tenth the user typed, not its binary neighbour
        return Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        raise RecipeError(f"the multiplier of {label!r} is not a finite number: {value!r}",
                          model=label) from None


class _Walk:
    """Depth-first over the lineage; memoised per model, so shared sub-merges cost nothing."""

    def __init__(self, top: Any, models: Mapping[str, Any], expand: Expand) -> None:
        self.top = top
        self.models = {str(k).lower(): v for k, v in models.items()}
        self.expand = expand
        self.memo: dict[str, dict[str, Fraction]] = {}
        self.active: list[str] = []
        self.notes: list[str] = []
        self.vae: str | None = None

    def check(self, recipe: Any, label: str, top: bool) -> Fraction:
        if not isinstance(recipe, Mapping):
            raise RecipeError(f"the sd_merge_recipe of {label!r} is not an object", model=label)
        if recipe.get("type") != "webui":
            hint = ("; `sdmerge recipe import` converts supermerger's own record of its last merge"
                    if recipe.get("type") == "sd-webui-supermerger" else "")
            raise RecipeError(f"{label!r} was merged by {recipe.get('type')!r}, not A1111's own merger; "
                              f"sdmerge cannot rebuild it (resolve that model as a file instead){hint}",
                              model=label, details={"type": recipe.get("type")})
        unknown = sorted(set(recipe) - RECIPE_KEYS)
        if unknown:
            raise RecipeError(f"the sd_merge_recipe of {label!r} has unknown keys: {', '.join(unknown)}",
                              model=label, details={"keys": unknown})
        method = recipe.get("interp_method")
        if method not in METHOD_WEIGHTS:
            raise RecipeError(f"{label!r} uses an unknown interp_method {method!r}", model=label,
                              details={"interp_method": method, "known": sorted(METHOD_WEIGHTS)})
        if recipe.get("discard_weights"):
            raise RecipeError(f"{label!r} discards the weights matching {recipe['discard_weights']!r}: "
                              "dropping keys is not supported", model=label)
        vae = recipe.get("bake_in_vae")
        if vae not in (None, "", "None"):
            if not top:
                raise RecipeError(f"{label!r} has the VAE {vae!r} baked in below the top merge, which "
                                  "cannot be flattened (resolve that model as a file instead)", model=label)
            self.vae = str(vae)
            self.notes.append(f"the VAE {vae!r} is baked in: it becomes the vae component, known by name")
        for flag, kind in (("is_inpainting", "inpainting"), ("is_instruct_pix2pix", "instruct-pix2pix")):
            if recipe.get(flag):
                self.notes.append(f"{label!r} is an {kind} model: every leaf must be one too (A1111 could "
                                  "merge plain models into one channel by channel; sdmerge does not)")
        for unused in HASH_FIELDS[len(METHOD_WEIGHTS[method]):]:
            if recipe.get(unused):
                self.notes.append(f"{label!r}: {unused} is not used by {method!r}; ignored")
        return Fraction(0) if method == "No interpolation" else _multiplier(recipe, label)

    def recipe(self, recipe: Any, label: str, top: bool = False) -> tuple[dict[str, Fraction], dict]:
        m = self.check(recipe, label, top)
        weights: dict[str, Fraction] = {}
        inputs = []
        terms = METHOD_WEIGHTS[recipe["interp_method"]]
        for hash_field, role, weight_of in zip(HASH_FIELDS, "ABC", terms, strict=False):
            sha = recipe.get(hash_field)
            if not isinstance(sha, str) or not sha:
                raise RecipeError(
                    f"{label!r} has no hash for its {hash_field} (A1111 had not hashed that model yet)",
                    model=label, details={"field": hash_field, "unreferenced_entries": self.unreferenced()},
                )
            w = weight_of(m)
            sub, node = self.model(sha.lower(), label)
            inputs.append({"role": role, "weight": str(w), **node})
            for leaf, leaf_weight in sub.items():
                weights[leaf] = weights.get(leaf, Fraction(0)) + w * leaf_weight
        tree = {"method": recipe["interp_method"], "multiplier": recipe.get("multiplier"), "inputs": inputs}
        return weights, tree

    def model(self, sha: str, parent: str) -> tuple[dict[str, Fraction], dict[str, Any]]:
        entry = self.models.get(sha)
        if not isinstance(entry, Mapping):
            raise RecipeError(f"{parent!r} merges a model with no entry in sd_merge_models (A1111 records "
                              "every input it merges: the metadata was edited or written by another tool)",
                              model=sha, details={"parent": parent})
        name = entry.get("name")
        label, node = name or sha, {"sha256": sha, "name": name}
        if sha in self.active:
            cycle = [*self.active[self.active.index(sha):], sha]
            raise RecipeError(f"the recipe of {label!r} refers to itself", model=label,
                              details={"cycle": cycle})
        if sha in self.memo:
            return self.memo[sha], {**node, "repeated": True}
        if len(self.active) >= MAX_LINEAGE_DEPTH:
            raise RecipeError(f"the lineage is more than {MAX_LINEAGE_DEPTH} merges deep", model=label,
                              details={"max_depth": MAX_LINEAGE_DEPTH})
        recipe = _decode(entry.get("sd_merge_recipe"), "sd_merge_recipe", label)
        reason = None if recipe is None else self.keep_reason(name, recipe)
        if recipe is None or reason:
            if not _SHA256.fullmatch(sha):
                raise RecipeError("a key of sd_merge_models is not a sha256", model=sha,
                                  details={"name": name})
            if reason:
                self.notes.append(f"kept {label!r} as a checkpoint: {reason}")
                node["kept"] = reason
            self.memo[sha] = {sha: Fraction(1)}
        else:
            self.active.append(sha)
            self.memo[sha], node["recipe"] = self.recipe(recipe, label)
            self.active.pop()
        return self.memo[sha], node

    def keep_reason(self, name: Any, recipe: Any) -> str | None:
        if self.expand != "lineage":
            return None if self.expand == "all" else "not expanded (expand='none')"
        if not isinstance(recipe, Mapping) or recipe.get("type") != "webui":
            kind = recipe.get("type") if isinstance(recipe, Mapping) else type(recipe).__name__
            return f"its recipe is a {kind!r} merge, which sdmerge cannot rebuild"
        given = recipe.get("custom_name") or self.generated_name(recipe)
        given = f"{given}{'.inpainting' * bool(recipe.get('is_inpainting'))}"
        given += ".instruct-pix2pix" * bool(recipe.get("is_instruct_pix2pix"))
        if _stem(str(name or "")) != given:
            return f"its file name is not the one its merge gave it ({given!r}): renamed or obtained elsewhere"
        return None

    def generated_name(self, recipe: Mapping[str, Any]) -> str | None:
        """The name A1111 gives a merge whose custom_name is empty."""
        a, b, c = (_stem(str(e.get("name") or "").replace("\\", "_").replace("/", "_"))
                   if isinstance(e := self.models.get(str(recipe.get(f)).lower()), Mapping) else None
                   for f in HASH_FIELDS)
        try:
            m = float(recipe.get("multiplier"))
        except (TypeError, ValueError):
            return None
        return {"Weighted sum": f"{round(1 - m, 2)}({a}) + {round(m, 2)}({b})",
                "Add difference": f"{a} + {round(m, 2)}({b} - {c})",
                "No interpolation": a}.get(recipe.get("interp_method"))

    def unreferenced(self) -> list[str]:
        """Entries no recipe names: the likely owners of a null hash, listed for the user, not picked."""
        named: set[str] = set()
        for entry in [{"sd_merge_recipe": self.top}, *self.models.values()]:
            recipe = _decode(entry.get("sd_merge_recipe"), "sd_merge_recipe") if isinstance(entry, Mapping) else None
            if isinstance(recipe, Mapping):
                named.update(str(v).lower() for v in recipe.values() if isinstance(v, str))
        return [e.get("name") or h for h, e in self.models.items() if h not in named and isinstance(e, Mapping)]


def convert_a1111(metadata: Mapping[str, Any], *, expand: Expand = "lineage") -> A1111Conversion:
    """A1111 metadata (the `__metadata__` wrapper or the bare mapping) -> a flat native recipe."""
    inner = _inner(metadata) if isinstance(metadata, Mapping) else None
    if inner is None:
        raise RecipeError("no A1111 merge metadata (sd_merge_recipe) found")
    top = _decode(inner["sd_merge_recipe"], "sd_merge_recipe")
    models = _decode(inner.get("sd_merge_models"), "sd_merge_models")
    if not isinstance(models, Mapping):
        raise RecipeError("sd_merge_models is missing or not an object")
    if len(models) > MAX_LINEAGE_MODELS:
        raise RecipeError(f"sd_merge_models lists {len(models)} models; at most {MAX_LINEAGE_MODELS} are read")
    name = top.get("custom_name") or None if isinstance(top, Mapping) else None
    walk = _Walk(top, models, expand)
    weights, tree = walk.recipe(top, name or "the merge", top=True)
    names = {sha: walk.models[sha].get("name") for sha in weights}
    cancelled = [names[s] or s for s, w in weights.items() if w == 0]
    if cancelled:
        walk.notes.append(f"left out leaves whose weights cancel to 0: {', '.join(cancelled)}")
    leaves = tuple(LeafWeight(s, names[s], w) for s, w in weights.items() if w != 0)
    if not leaves:
        raise RecipeError("every leaf weight cancels to 0", model=name or "the merge")
    if name is not None and (not isinstance(name, str) or len(name) > 200 or re.search(r"[/\\\0]", name)):
        walk.notes.append(f"the custom_name {name!r} cannot name a recipe; left out")
        name = None
    models_json = [{"model": {"sha256": lw.sha256, "name": lw.name}, "weight": float(lw.weight)}
                   for lw in leaves]
    data: dict[str, Any] = {
        "name": name,
        "merge": {"method": "weighted", "normalize": False, "models": models_json},
        "output": {"dtype": "fp16" if top.get("save_as_half") else "fp32"},
    }
    vae = LeafWeight(None, walk.vae, Fraction(1)) if walk.vae else None
    if vae:
        data["components"] = {"vae": {"name": vae.name}}
    return A1111Conversion(parse_recipe(data), leaves, tuple(walk.notes), {"name": name, **tree}, vae)


def resolve_overrides(items: list[str]) -> dict[str, str]:
    """`--resolve NAME_OR_SHA=PATH` items -> {lowercase sha256 prefix (10+ hex) or file name: path}."""
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, path = item.partition("=")
        key = key.strip()
        is_hash = key.lower().startswith("sha256:")
        key = key[len("sha256:"):] if is_hash else key
        if not sep or not key or not path:
            raise RecipeError(f"--resolve expects NAME_OR_SHA=PATH, got {item!r}", details={"argument": item})
        if _HEX_PREFIX.fullmatch(key.lower()):
            key = key.lower()
        elif is_hash:
            raise RecipeError(f"--resolve: {key!r} is not a sha256 or a prefix of 10+ hex digits", model=key)
        if overrides.get(key, path) != path:
            raise RecipeError(f"--resolve names {key!r} twice, with different paths", model=key)
        overrides[key] = path
    return overrides


def apply_resolution(
    conversion: A1111Conversion, overrides: Mapping[str, str], find: Callable[[LeafWeight], Path | None]
) -> tuple[Recipe, list[LeafWeight]]:
    """The recipe with leaves located where known, and the leaves still unresolved.

    A leaf takes an override matching its sha256 prefix, else one matching its name or base name
    (A1111 names hold the sub-folder), else `find(leaf)` (by sha256, the name a hint). An override must match exactly
    one leaf. A located leaf becomes `{"sha256", "name": path}`: paths are not hashed here, the
    plan checks each file against the sha256.
    """
    leaves = [*conversion.leaves, *([conversion.vae] if conversion.vae else [])]

    def matches(key: str, leaf: LeafWeight) -> bool:
        if _HEX_PREFIX.fullmatch(key):
            return (leaf.sha256 or "").startswith(key)
        return bool(leaf.name) and key in (leaf.name, _base_name(leaf.name or ""))

    for key in overrides:
        hits = [leaf.label() for leaf in leaves if matches(key, leaf)]
        if len(hits) != 1:
            problem = "matches several models" if hits else "matches no model of this recipe"
            raise RecipeError(f"--resolve {key} {problem}", model=key, details={"matches": hits})
    by_hash_first = sorted(overrides, key=lambda k: not _HEX_PREFIX.fullmatch(k))
    paths: dict[tuple[str | None, str | None], str] = {}
    unresolved: list[LeafWeight] = []
    for leaf in leaves:
        key = next((k for k in by_hash_first if matches(k, leaf)), None)
        path = overrides[key] if key else find(leaf)
        if path is None:
            unresolved.append(leaf)
        else:
            paths[(leaf.sha256, leaf.name)] = str(path)

    def to_path(leaf: Any) -> Any:
        if not isinstance(leaf, ModelLeaf) or (leaf.sha256, leaf.name) not in paths:
            return leaf if not isinstance(leaf, ModelLeaf) else leaf.model_dump(mode="json")
        path = paths[(leaf.sha256, leaf.name)]
        # keep the sha256 beside the path, so the plan still checks the file is the one meant
        return {"sha256": leaf.sha256, "name": path} if leaf.sha256 else path

    return rewrite_leaves(conversion.recipe, to_path), unresolved
