"""What a checkpoint's metadata says about how it was made: its own merge, and its ancestors'.

sdmerge writes `sdmerge_recipe` (the canonical recipe, leaves named by sha256) and
`sdmerge_inputs`; A1111's Checkpoint Merger writes `sd_merge_recipe` (its last merge) and
`sd_merge_models` (sha256 -> {name, legacy_hash, sd_merge_recipe}), into which every merge copies
its inputs' own, so one file carries its whole history; sdmerge writes those two keys as well.
`recorded_lineage` reads them once (when a file is registered) into a small summary:

    {"merge": {"tool", "method", "name", "recipe_hash",
               "parents": [{"sha256", "name", "weight", "components"?}]} | null,
     "ancestors": {sha256: {"name", "legacy_hash", "merge": {...} | null}},
     "truncated": bool}

A weight is the parent's exact coefficient in the flattened merge ("1/3", "-1/2"), null where
the merge is not a weighted sum of its parents (a non-linear method, block weights); a parent
that feeds named components lists its weight per component. Nothing unreadable is an error: a
file's lineage is a claim its author made, kept where it makes sense and dropped where it does
not. Sizes are bounded (text, ancestors, parents); cycles are the graph walker's business.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from .a1111 import HASH_FIELDS, METHOD_WEIGHTS
from .errors import RecipeError
from .jsonsafe import try_loads
from .methods import MethodNode
from .methods.linear import flatten
from .recipe import ModelLeaf, all_leaves, iter_leaves, parse_recipe

MAX_TEXT = 4 << 20  # a metadata value longer than this is not read (as plan.MAX_CARRIED_LINEAGE)
MAX_ANCESTORS = 2_000  # sd_merge_models entries kept; community soups carry a few hundred
MAX_PARENTS = 1_000  # parents of one merge (a recipe names at most 1,000 distinct models)
MAX_EDGES = 10_000  # parents of every merge together: the summary stays a few MB at worst
_SHA256 = re.compile(r"[0-9a-f]{64}")


def recorded_lineage(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """The lineage `metadata` (a header's `__metadata__`, values as text or already decoded)
    records, or None if it records none."""
    models = _decoded(metadata.get("sd_merge_models"))
    models = models if isinstance(models, Mapping) else {}
    merge = _own_merge(metadata, models)
    ancestors: dict[str, Any] = {}
    truncated = merge is not None and merge.pop("truncated", False)
    for key, entry in models.items():
        sha256 = _sha256(key)
        if sha256 is None or not isinstance(entry, Mapping):
            continue
        if len(ancestors) >= MAX_ANCESTORS:
            truncated = True
            break
        found = _merge_of(entry.get("sd_merge_recipe"), models)
        truncated |= bool(found and found.pop("truncated", False))
        ancestors[sha256] = {"name": _text(entry.get("name")), "legacy_hash": _text(entry.get("legacy_hash")),
                             "merge": found}
    if merge is None and not ancestors:
        return None
    left = MAX_EDGES
    for found in (merge, *(a["merge"] for a in ancestors.values())):
        if found is not None:
            truncated |= len(found["parents"]) > left
            del found["parents"][max(left, 0):]
            left -= len(found["parents"])
    return {"merge": merge, "ancestors": ancestors, "truncated": truncated}


def _own_merge(metadata: Mapping[str, Any], models: Mapping[str, Any]) -> dict[str, Any] | None:
    recipe = _decoded(metadata.get("sdmerge_recipe"))
    if recipe is not None:
        found = _sdmerge_merge(recipe, _text(metadata.get("sdmerge_recipe_hash")))
        if found is not None:
            return found
    inputs = _decoded(metadata.get("sdmerge_inputs"))
    if isinstance(inputs, list) and inputs:  # a recipe this version cannot read: its inputs still are
        parents = [{"sha256": _sha256(i.get("sha256")), "name": _text(i.get("name")), "weight": None}
                   for i in inputs[:MAX_PARENTS] if isinstance(i, Mapping)]
        return {"tool": "sdmerge", "method": None, "name": None,
                "recipe_hash": _text(metadata.get("sdmerge_recipe_hash")),
                "parents": [p for p in parents if p["sha256"] or p["name"]], "truncated": len(inputs) > MAX_PARENTS}
    return _merge_of(metadata.get("sd_merge_recipe"), models)


def _merge_of(value: Any, models: Mapping[str, Any]) -> dict[str, Any] | None:
    """A merge as `sd_merge_recipe` records it: A1111's own, or sdmerge's (its recipe inside)."""
    recipe = _decoded(value)
    if not isinstance(recipe, Mapping):
        return None
    if recipe.get("type") == "sdmerge":
        return _sdmerge_merge(recipe.get("recipe"), None)
    if any(field in recipe for field in HASH_FIELDS):
        return _webui_merge(recipe, models)
    return None


def _sdmerge_merge(data: Any, recipe_hash: str | None) -> dict[str, Any] | None:
    try:
        recipe = parse_recipe(data) if isinstance(data, Mapping) else None
    except RecipeError:
        return None
    if recipe is None:
        return None
    parents: dict[Any, dict[str, Any]] = {}
    leaves = all_leaves(recipe)
    for leaf in leaves:
        who = _identity(leaf)
        if who is not None and who not in parents and len(parents) < MAX_PARENTS:
            parents[who] = {"sha256": who[0], "name": who[1], "weight": None}
    for leaf, weight in _weights(recipe.merge).items():
        if (who := _identity(leaf)) in parents:
            parents[who]["weight"] = str(weight)
    for component, source in recipe.components.items():
        weights = {_identity(leaf): w for leaf, w in _weights(source).items()}
        for leaf in iter_leaves(source):
            if (who := _identity(leaf)) in parents:
                found = weights.get(who)
                parents[who].setdefault("components", {})[component] = None if found is None else str(found)
    method = recipe.merge.method if isinstance(recipe.merge, MethodNode) else "copy"
    return {"tool": "sdmerge", "method": method, "name": recipe.name, "recipe_hash": recipe_hash or recipe.recipe_hash(),
            "parents": list(parents.values()), "truncated": len(leaves) > len(parents)}


def _weights(source: Any) -> dict[Any, Fraction]:
    """{leaf: exact coefficient} of a linear source; non-linear parts and block weights have none."""
    try:
        return {leaf: c for leaf, c in flatten(source).items() if _identity(leaf) is not None}
    except (RecipeError, ValueError, TypeError, ZeroDivisionError):
        return {}


def _identity(leaf: Any) -> tuple[str | None, str | None] | None:
    leaf = getattr(leaf, "ref", leaf)  # a LoRA's file
    if isinstance(leaf, ModelLeaf):
        return leaf.sha256, leaf.name
    if isinstance(leaf, str):
        return (leaf[7:].lower(), None) if _sha256(leaf[7:]) and leaf.lower().startswith("sha256:") else (None, leaf)
    return None


def _webui_merge(recipe: Mapping[str, Any], models: Mapping[str, Any]) -> dict[str, Any]:
    method = _text(recipe.get("interp_method"))
    weights = METHOD_WEIGHTS.get(method or "")
    multiplier = _fraction(recipe.get("multiplier"))
    parents = []
    for index, field in enumerate(HASH_FIELDS):
        sha256 = _sha256(recipe.get(field))
        if sha256 is None or (weights is not None and index >= len(weights)):
            continue
        entry = models.get(sha256) or models.get(recipe.get(field)) or {}
        weight = weights[index](multiplier) if weights is not None and multiplier is not None else None
        parents.append({"sha256": sha256, "name": _text(entry.get("name")) if isinstance(entry, Mapping) else None,
                        "weight": None if weight is None else str(weight)})
    return {"tool": "webui", "method": method, "name": _text(recipe.get("custom_name")), "recipe_hash": None,
            "parents": parents}


def _fraction(value: Any) -> Fraction | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = Fraction(repr(value) if isinstance(value, float) else value)
    except (ValueError, ZeroDivisionError):
        return None
    return number if abs(number) <= 1_000 else None


def _decoded(value: Any) -> Any:
    if isinstance(value, str):
        return try_loads(value) if len(value) <= MAX_TEXT and value[:1] in "{[" else None
    return value if isinstance(value, Mapping | list) else None


def _sha256(value: Any) -> str | None:
    if isinstance(value, str) and _SHA256.fullmatch(value := value.strip().lower()):
        return value
    return None


def _text(value: Any, limit: int = 255) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None
