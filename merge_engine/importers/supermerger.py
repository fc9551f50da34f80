"""supermerger's recorded merges -> native recipes.

Read from hako-mikan/sd-webui-supermerger, scripts/mergers/mergers.py (`smerge`, `rwmergelog`,
`overwrite_last_weights`, `blockfromkey`):

* `mergehistory.csv`: one row per merge. `rwmergelog` appends `ID, time, name` then `smerge`'s
  `mergedmodel` list: weights alpha, weights beta, model A, B, C (A1111 short hashes, 10 hex),
  alpha, beta, mode (rewritten to e.g. `Weight sum:A*(1-alpha)+B*alpha`), use MBW, custom name,
  save settings, ID settings, elemental, calcmode, seed, adjust, opt value, include/exclude,
  excluded blocks, excluded elements; `overwrite_last_weights` then replaces the weights with
  `"base,IN00,...,OUT11"` as merged (excluded blocks zeroed) and rewrites the file with
  `csv.writer`. The header row it created first names only the first 16 columns, one of them
  wrongly ("plus lora" is the custom name): rows are read by position.
* the `sd_merge_recipe` of a model it saved: `{"type": "sd-webui-supermerger", "weights_alpha":
  [25 or 20 floats, BASE left out], "base_alpha", ..., "model_a": sha256, "mode", "mbw",
  "elemental_merge", "calcmode", "<Off|Include|Exclude>": [...]}` and `sd_merge_models` (sha256 ->
  name, legacy hash).

The formulas (`smerge`, calcmode "normal"): Weight sum `(1-a)A + aB`; Add difference `A + a(B-C)`;
Triple sum `(1-a-b)A + aB + bC`; sum Twice `(1-b)((1-a)A + aB) + bC`. Which weight a key takes
(`blockfromkey`): SD1/SD2 text encoder and VAE keys BASE, `time_embed` IN00, the final `out` OUT11;
SDXL text encoders and VAE BASE, `time_embed` and `label_emb` IN00, `out` OUT08. A key whose name
holds neither "weight" nor "bias" (OpenCLIP's positional_embedding, text_projection, logit_scale) is
not merged: model A's is kept, written here as a key override of 0.

Every other calcmode (cosineA/B, trainDifference, smoothAdd, extract, tensor, self, plus random),
elemental merges, include/exclude and the adjust ("fine") settings are refused: sdmerge has no
exact form for them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

from ..errors import RecipeError
from ..jsonsafe import try_loads
from ..recipe import parse_recipe
from . import Imported, ImportedLeaf, exact_number

COLUMNS = ("ID", "time", "name", "weights alpha", "weights beta", "model A", "model B", "model C", "alpha", "beta",
           "mode", "use MBW", "custom name", "save setting", "use ID", "elemental", "calcmode", "seed", "adjust",
           "opt value", "inex", "ex blocks", "ex elements")
MODES = ("Add", "Triple", "Twice", "Weight")  # tested in this order, as smerge does
SD_BLOCKS = ("IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "IN09", "IN10", "IN11", "M00",
             "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
XL_BLOCKS = ("IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00",
             "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08")
SD_PLACED = {"TIME_EMBED": "IN00", "OUT": "OUT11", "VAE": "BASE"}
XL_PLACED = {"TIME_EMBED": "IN00", "LABEL_EMB": "IN00", "OUT": "OUT08", "VAE": "BASE"}
# the float keys of SD1/SD2/SDXL checkpoints whose names hold neither "weight" nor "bias"
UNMERGED = ("*.positional_embedding", "*.text_projection", "*.logit_scale")


def block_map(base: float, values: list[float], where: str) -> dict[str, Any]:
    """supermerger's per-block list (BASE apart) as a block map placed as `blockfromkey` places it."""
    if len(values) == len(SD_BLOCKS):
        names, placed = SD_BLOCKS, SD_PLACED
    elif len(values) in (len(XL_BLOCKS), len(XL_BLOCKS) + 1):  # smerge pads SDXL's 19 with a VAE value it never reads
        names, placed = XL_BLOCKS, XL_PLACED
    else:
        raise RecipeError(f"{where}: {len(values) + 1} block weights (BASE included); sdmerge imports supermerger's "
                          "26 (SD1/SD2) and 20 (SDXL) — not its 61 (Flux) or 110 (extended SDXL)",
                          details={"field": where, "count": len(values) + 1})
    blocks = {"BASE": base, **dict(zip(names, values, strict=False))}
    blocks.update({target: blocks[source] for target, source in placed.items()})
    return {"blocks": blocks, "overrides": [{"keys": k, "value": 0.0} for k in UNMERGED]}


def _plain(value: float) -> dict[str, Any]:
    return {"default": value, "overrides": [{"keys": k, "value": 0.0} for k in UNMERGED]}


def build(*, mode: Any, calcmode: Any, alpha: dict, beta: dict, models: tuple[Any, Any, Any], where: str) -> dict:
    """The merge for `mode` under calcmode "normal"; alpha and beta are block maps."""
    if calcmode != "normal":
        raise RecipeError(f"{where}: calcmode {calcmode!r} has no exact native form (sdmerge imports supermerger's "
                          "\"normal\" merges only)", details={"field": "calcmode", "calcmode": calcmode})
    kind = mode_kind(mode, where)
    a, b, c = models
    if kind == "Weight":
        return {"method": "weighted_sum", "a": a, "b": b, "alpha": alpha}
    if kind == "Add":
        return {"method": "add_difference", "a": a, "b": b, "c": c, "alpha": alpha}
    if kind == "Twice":
        return {"method": "weighted_sum", "a": {"method": "weighted_sum", "a": a, "b": b, "alpha": alpha},
                "b": c, "alpha": beta}
    # (1 - a - b) A + a B + b C, written without arithmetic on the weights: A + a (B - A) + b (C - A)
    return {"method": "add_difference", "a": {"method": "add_difference", "a": a, "b": b, "c": a, "alpha": alpha},
            "b": c, "c": a, "alpha": beta}


def _weights(text: Any, where: str) -> tuple[float, list[float]]:
    items = [t.strip() for t in str(text).split(",")]
    numbers = [exact_number(t, f"{where} item {i + 1}") for i, t in enumerate(items)]
    return numbers[0], numbers[1:]


def _refuse_extras(where: str, *, elemental: Any, adjust: Any, inex: Any, excluded: bool) -> None:
    if elemental not in (None, "", [], [""]):
        raise RecipeError(f"{where}: elemental merge {str(elemental)[:200]!r} is not imported (sdmerge's key "
                          "overrides do not follow supermerger's elemental matching)", details={"field": "elemental"})
    if isinstance(adjust, str) and adjust.rstrip(",0") != "":
        raise RecipeError(f"{where}: the adjust setting {adjust!r} changes weights outside any merge formula; "
                          "it is not imported", details={"field": "adjust"})
    if inex not in (None, "", "Off") and excluded:
        raise RecipeError(f"{where}: {inex} of blocks or elements is not imported", details={"field": "inex"})


def mode_kind(mode: Any, where: str) -> str:
    kind = next((m for m in MODES if isinstance(mode, str) and m in mode), None)
    if kind is None:
        raise RecipeError(f"{where}: unknown mode {mode!r} (supermerger's are Weight sum, Add difference, Triple sum "
                          "and sum Twice)", details={"field": "mode", "mode": mode})
    return kind


# -- mergehistory.csv ---------------------------------------------------------------------------

def read_history(text: str) -> list[list[str]]:
    csv.field_size_limit(2244096)  # as rwmergelog does: a row's weights and settings are long
    try:
        rows = [row for row in csv.reader(io.StringIO(text)) if row]
    except csv.Error as exc:
        raise RecipeError(f"mergehistory.csv is not CSV: {exc}") from None
    if not rows or rows[0][:3] != ["ID", "time", "name"]:
        raise RecipeError("mergehistory.csv: the first row must be supermerger's header (ID, time, name, ...)")
    return rows[1:]


def convert_history(text: str, *, row: int | None = None) -> Imported:
    """One merge of a supermerger `mergehistory.csv`: the row whose ID is `row`, else the last."""
    rows = read_history(text)
    if not rows:
        raise RecipeError("mergehistory.csv records no merge")
    found = rows[-1] if row is None else next((r for r in rows if r[0].strip() == str(row)), None)
    if found is None:
        raise RecipeError(f"mergehistory.csv has no row with ID {row}",
                          details={"row": row, "ids": [r[0] for r in rows][-50:]})
    where = f"mergehistory.csv row ID {found[0]}"
    if len(found) < 17:
        raise RecipeError(f"{where}: {len(found)} columns; supermerger writes at least 17 (ID to calcmode)",
                          details={"row": found[0]})
    r = dict(zip(COLUMNS, found, strict=False))
    _refuse_extras(where, elemental=r.get("elemental"), adjust=r.get("adjust"), inex=r.get("inex"),
                   excluded=_listed(r.get("ex blocks")) or bool(r.get("ex elements", "").strip()))
    mbw = r["use MBW"].strip()
    if mbw not in ("True", "False"):
        raise RecipeError(f"{where}: use MBW is {mbw!r}, not True or False", details={"field": "use MBW"})
    if mbw == "True":
        alpha = block_map(*_weights(r["weights alpha"], f"{where}, weights alpha"), f"{where}, weights alpha")
        uses_beta = any(m in r["mode"] for m in ("Triple", "Twice"))
        beta = (block_map(*_weights(r["weights beta"], f"{where}, weights beta"), f"{where}, weights beta")
                if uses_beta else _plain(0.0))
    else:
        alpha = _plain(exact_number(r["alpha"], f"{where}, alpha"))
        beta = _plain(exact_number(r["beta"], f"{where}, beta"))
    used = "AB" if mode_kind(r["mode"], where) == "Weight" else "ABC"
    models = tuple(_short_hash(r[f"model {x}"], f"{where}, model {x}") if x in used else None for x in "ABC")
    merge = build(mode=r["mode"], calcmode=r["calcmode"].strip(), alpha=alpha, beta=beta, models=models, where=where)
    warnings = []
    half = "fp16" in r.get("save setting", "")
    if not half:
        warnings.append("supermerger saved this merge in its inputs' dtype (no fp16 in its save settings); "
                        "the recipe writes fp32")
    if "Reset CLIP ids" in r.get("save setting", ""):
        warnings.append("supermerger reset the CLIP position_ids; sdmerge copies model A's")
    name = r.get("custom name", "").strip() or None
    data = {"name": name if name and not any(c in name for c in "/\\\0") else None, "merge": merge,
            "output": {"dtype": "fp16" if half else "fp32"}}
    return Imported(parse_recipe(data), "supermerger-history", tuple(warnings))


def _listed(value: Any) -> bool:
    return isinstance(value, str) and value.strip() not in ("", "[]")


def _short_hash(value: str, where: str) -> str:
    value = value.strip().lower()
    if not (10 <= len(value) <= 64 and all(c in "0123456789abcdef" for c in value)):
        raise RecipeError(f"{where}: {value[:80]!r} is not an A1111 short hash", details={"field": where})
    return f"sha256:{value}"


# -- the metadata of a saved model ----------------------------------------------------------------

def _recipe_of(metadata: Mapping[str, Any]) -> Any:
    inner = metadata.get("__metadata__", metadata)
    recipe = inner.get("sd_merge_recipe") if isinstance(inner, Mapping) else None
    return try_loads(recipe) if isinstance(recipe, str) else recipe


def is_supermerger_metadata(metadata: Any) -> bool:
    recipe = _recipe_of(metadata) if isinstance(metadata, Mapping) else None
    return isinstance(recipe, Mapping) and recipe.get("type") == "sd-webui-supermerger"


def convert_metadata(metadata: Mapping[str, Any]) -> Imported:
    """A supermerger-saved model's metadata (`__metadata__` or the bare mapping) -> its last merge.
    The models it names by sha256 are leaves `{sha256, name}` (supermerger records no lineage)."""
    recipe = _recipe_of(metadata)
    where = "supermerger's sd_merge_recipe"
    if not isinstance(recipe, Mapping) or recipe.get("type") != "sd-webui-supermerger":
        raise RecipeError("no supermerger sd_merge_recipe found")
    inner = metadata.get("__metadata__", metadata)
    models = inner.get("sd_merge_models", {})
    if isinstance(models, str) and (models := try_loads(models)) is None:
        raise RecipeError("sd_merge_models is not JSON (or nests deeper than JSON recipes may)")
    models = {str(k).lower(): v for k, v in models.items()} if isinstance(models, Mapping) else {}
    inex = next((k for k in ("Off", "Include", "Exclude") if k in recipe), None)
    excluded = recipe.get(inex or "")
    _refuse_extras(where, elemental=recipe.get("elemental_merge"), adjust=None, inex=inex,
                   excluded=isinstance(excluded, list) and any(excluded))
    used = "ab" if mode_kind(recipe.get("mode"), where) == "Weight" else "abc"
    if recipe.get("mbw"):
        alpha = block_map(_number(recipe.get("base_alpha"), f"{where}: base_alpha"),
                          _numbers(recipe.get("weights_alpha"), f"{where}: weights_alpha"), f"{where}: weights_alpha")
        beta_list = recipe.get("weights_beta")
        beta = (block_map(_number(recipe.get("base_beta"), f"{where}: base_beta"),
                          _numbers(beta_list, f"{where}: weights_beta"), f"{where}: weights_beta")
                if isinstance(beta_list, list) and any(m in str(recipe.get("mode")) for m in ("Triple", "Twice"))
                else _plain(0.0))
    else:
        alpha = _plain(_number(recipe.get("base_alpha"), f"{where}: base_alpha"))
        beta = _plain(_number(recipe.get("base_beta"), f"{where}: base_beta"))
    leaves, refs = [], []
    for x in used:
        sha = str(recipe.get(f"model_{x}") or "").lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise RecipeError(f"{where}: model_{x} is not a sha256: {sha[:80]!r}", details={"field": f"model_{x}"})
        entry = models.get(sha)
        name = entry.get("name") if isinstance(entry, Mapping) and isinstance(entry.get("name"), str) else None
        leaves.append(ImportedLeaf(sha, name))
        refs.append({"sha256": sha, "name": name} if name else {"sha256": sha})
    merge = build(mode=recipe.get("mode"), calcmode=recipe.get("calcmode"), alpha=alpha, beta=beta,
                  models=(*refs, None)[:3], where=where)
    warnings = ("supermerger records neither the output dtype nor a baked VAE in this metadata: the recipe "
                "writes fp16",)
    return Imported(parse_recipe({"merge": merge, "output": {"dtype": "fp16"}}), "supermerger-metadata", warnings,
                    tuple(dict.fromkeys(leaves)))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RecipeError(f"{where} is not a number: {value!r}", details={"field": where})
    return exact_number(repr(value) if isinstance(value, float) else str(value), where)


def _numbers(values: Any, where: str) -> list[float]:
    if not isinstance(values, list):
        raise RecipeError(f"{where} is not a list of numbers", details={"field": where})
    return [_number(v, f"{where} item {i + 1}") for i, v in enumerate(values)]
