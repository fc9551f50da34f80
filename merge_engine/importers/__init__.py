"""Recipes other tools wrote, imported as native recipes with exact weights.

* `mecha`: sd-mecha's `.mecha` text (its serializer's grammar), method by method;
* `supermerger`: supermerger's `mergehistory.csv` rows and the `sd_merge_recipe` it writes into
  the models it saves.

What a recipe says that sdmerge cannot do exactly (an unknown method or instruction, a calcmode
with no native form, a parameter sdmerge lacks) is a `RecipeError` naming the line, row or field,
never an approximation. Importing reads no weights and imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..recipe import Recipe

MAX_IMPORT_BYTES = 64 << 20


@dataclass(frozen=True)
class ImportedLeaf:
    """A model an imported recipe names by hash (supermerger metadata): what `--resolve` matches."""

    sha256: str | None
    name: str | None

    def label(self) -> str:
        return self.name or f"sha256:{self.sha256}"


@dataclass(frozen=True)
class Imported:
    recipe: Recipe
    source: str  # "mecha", "supermerger-history", "supermerger-metadata"
    warnings: tuple[str, ...] = ()
    leaves: tuple[ImportedLeaf, ...] = ()  # the leaves named by sha256 (none for paths)
    vae: None = None  # the shape `a1111.apply_resolution` reads


def exact_number(text: str, where: str) -> float:
    """A number as the decimal its text wrote. A recipe holds floats, read back as the shortest
    decimal that round-trips (`methods.linear.exact`); a text with more digits than that
    (0.1000000000000000001) would silently become another number, so it is refused."""
    try:
        value = float(text)
        wanted = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise RecipeError(f"{where}: {text!r} is not a number", details={"value": text}) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise RecipeError(f"{where}: {text!r} is not a finite number", details={"value": text})
    if Fraction(repr(value)) != wanted:
        raise RecipeError(f"{where}: {text!r} has more digits than a recipe weight holds (it would become "
                          f"{value!r})", details={"value": text})
    return value


def detect(path: Path, raw: bytes) -> str | None:
    """Which importer reads this file: by suffix, then by its first bytes."""
    head = raw[:4096].lstrip(b"\xef\xbb\xbf").lstrip()
    if path.suffix.lower() == ".mecha" or head.startswith(b"version "):
        return "mecha"
    # rwmergelog writes the header quoted; overwrite_last_weights rewrites it with csv.writer, unquoted
    if path.suffix.lower() == ".csv" or head.startswith((b'"ID","time","name"', b"ID,time,name,")):
        return "supermerger-history"
    return None


def import_file(path: str | Path, *, row: int | None = None) -> Imported:
    """A `.mecha` file, a supermerger history (`row` picks the ID; default the last row) or a
    supermerger-saved model's metadata (a JSON dump or the .safetensors file)."""
    from .. import jsonsafe
    from ..a1111 import load_a1111_metadata
    from . import mecha, supermerger

    path = Path(path)
    # Only a text recipe is read whole: a saved model is a checkpoint of gigabytes, its header read below.
    kind = detect(path, jsonsafe.read_file(path, "recipe file", 4096, RecipeError, prefix=True))
    if kind is not None:
        text = _text(jsonsafe.read_file(path, "recipe file", MAX_IMPORT_BYTES, RecipeError), path)
        return mecha.convert_mecha(text) if kind == "mecha" else supermerger.convert_history(text, row=row)
    metadata = load_a1111_metadata(path)
    if not supermerger.is_supermerger_metadata(metadata):
        raise RecipeError(f"{path.name} is neither a .mecha recipe, a supermerger mergehistory.csv nor the "
                          "metadata of a model supermerger saved", model=str(path))
    return supermerger.convert_metadata(metadata)


def import_data(data: Any) -> Imported | None:
    """A decoded JSON body or file that another tool's recipe is in, converted; None if it is not one:
    `{"mecha": TEXT}`, `{"supermerger_history": CSV TEXT, "row": ID}`, or supermerger's metadata."""
    from . import mecha, supermerger

    if not isinstance(data, dict):
        return None
    if "mecha" in data:
        _only(data, {"mecha"}, "mecha")
        if not isinstance(data["mecha"], str):
            raise RecipeError("mecha must be the text of a .mecha recipe")
        return mecha.convert_mecha(data["mecha"])
    if "supermerger_history" in data:
        _only(data, {"supermerger_history", "row"}, "supermerger_history")
        row = data.get("row")
        if not isinstance(data["supermerger_history"], str) or not (row is None or isinstance(row, int)):
            raise RecipeError("supermerger_history must be the text of a mergehistory.csv, row an integer ID")
        return supermerger.convert_history(data["supermerger_history"], row=row)
    if supermerger.is_supermerger_metadata(data):
        return supermerger.convert_metadata(data)
    return None


def resolve_refs(recipe: Recipe, overrides: Mapping[str, str]) -> Recipe:
    """The recipe with each model reference an override names (by the whole reference, e.g. a
    .mecha path, or by its file name) replaced by the override's; an override naming no
    reference is an error, so a typo is not silently ignored."""
    from ..recipe import ModelLeaf, all_leaves, rewrite_leaves

    refs = [leaf for leaf in all_leaves(recipe) if isinstance(leaf, str)]
    for key in overrides:
        if not any(key in (ref, _base_name(ref)) for ref in refs):
            raise RecipeError(f"resolve names {key!r}, which is no model reference of this recipe", model=key,
                              details={"references": refs[:100]})

    def swap(leaf: Any) -> Any:
        if isinstance(leaf, ModelLeaf):
            return leaf.model_dump(mode="json")
        return overrides.get(leaf, overrides.get(_base_name(leaf), leaf))

    return rewrite_leaves(recipe, swap) if overrides else recipe


def _base_name(ref: str) -> str:
    return re.split(r"[/\\]", ref)[-1]


def _only(data: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise RecipeError(f"a {what} body takes only {', '.join(sorted(allowed))}; not {', '.join(extra)}",
                          details={"fields": extra})


def _text(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RecipeError(f"{path.name} is not UTF-8 text", model=str(path)) from None
