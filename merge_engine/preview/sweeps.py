"""Sweeps: one base, many variants of it, sampled side by side; nothing is merged to disk.

A sweep is a base source (a model, a finished merge, a recipe: the caller resolves it) and one
axis, or two (an XY table), each a list of changes to the base:

* `text_encoder`, `unet`, `vae`: each candidate's component put into the base (SDXL's
  text_encoder axis swaps both text encoders);
* `leave_one_out`: the base's uniform or weighted node `at` (default `merge`) without one of its
  models at a time, after the whole of it ("all N"); derived in memory from the fp64 sum of the
  whole, one model read per variant (`pipeline.Anchor`);
* `weight`: one number of the recipe (`path`, e.g. `merge.models.2.weight` or `merge.alpha`)
  set to each of `values` (or `start` to `stop` in `steps`).

Variants of `leave_one_out` and `weight` sweeps accumulate in fp64 (their recipes say so, so
`sdmerge merge` of a variant's recipe writes the very weights that were previewed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from merge_engine.errors import OptionsError, RecipeError
from merge_engine.recipe import Recipe

SWAPS = {"text_encoder": "TE", "unet": "UNet", "vae": "VAE"}
KINDS = (*SWAPS, "leave_one_out", "weight")
MAX_AXIS = 256  # columns (or rows) of one axis
DERIVED = ("leave_one_out", "weight")  # kinds whose variants are derived from the base's sums


class Axis(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["text_encoder", "unet", "vae", "leave_one_out", "weight"]
    candidates: list[Any] = Field(default=[], description="text_encoder, unet, vae: the models (or finished "
                                                          "merges, or recipes) whose component is put into the base")
    at: str = Field(default="merge", description="leave_one_out: the uniform or weighted node, e.g. merge or "
                                                 "components.unet")
    path: str | None = Field(default=None, description="weight: the number, e.g. merge.models.2.weight, merge.alpha")
    values: list[float] | None = Field(default=None, description="weight: the values, one column each")
    start: float | None = None
    stop: float | None = None
    steps: int | None = Field(default=None, description="weight: start to stop in this many values, both included")

    @model_validator(mode="after")
    def _fields(self) -> Axis:
        swap = self.kind in SWAPS
        if swap != bool(self.candidates):
            raise ValueError(f"a {self.kind} axis {'needs' if swap else 'takes no'} candidates")
        if len(self.candidates) > MAX_AXIS:
            raise ValueError(f"at most {MAX_AXIS} candidates an axis")
        if self.kind != "weight":
            if self.path is not None or self.values is not None or self.steps is not None:
                raise ValueError(f"path, values, start, stop and steps are for a weight axis, not {self.kind}")
            return self
        if self.path is None:
            raise ValueError("a weight axis needs the path of the number it sets")
        ranged = (self.start, self.stop, self.steps)
        if (self.values is None) == all(v is None for v in ranged):
            raise ValueError("a weight axis takes values, or start, stop and steps")
        if self.values is None and any(v is None for v in ranged):
            raise ValueError("give start, stop and steps together")
        if self.steps is not None and not 2 <= self.steps <= MAX_AXIS:
            raise ValueError(f"steps must be between 2 and {MAX_AXIS}")
        values = self.numbers()
        if not values or len(values) > MAX_AXIS or not all(math.isfinite(v) for v in values):
            raise ValueError(f"a weight axis takes 1 to {MAX_AXIS} finite values")
        return self

    def numbers(self) -> list[float]:
        if self.values is not None:
            return list(self.values)
        assert self.start is not None and self.stop is not None and self.steps is not None
        return [self.start + (self.stop - self.start) * i / (self.steps - 1) for i in range(self.steps)]


class Sweep(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    base: Any = Field(description="a model reference, a finished merge or a recipe (as the caller names them)")
    x: Axis
    y: Axis | None = None

    @property
    def axes(self) -> list[Axis]:
        return [self.x] + ([self.y] if self.y is not None else [])

    @property
    def derived(self) -> bool:
        return any(axis.kind in DERIVED for axis in self.axes)


def parse_sweep(data: Any) -> Sweep:
    """A sweep from JSON: `{"base": B, "kind": K, ...}` (one axis) or `{"base": B, "x": {...},
    "y": {...}}` (an XY table: columns x, rows y)."""
    if not isinstance(data, dict):
        raise OptionsError("a sweep is a JSON object with a base and a kind (or x and y axes)")
    if "x" not in data and "kind" in data:
        data = {"base": data.get("base"), "x": {k: v for k, v in data.items() if k != "base"}}
    elif "kind" in data:
        raise OptionsError("give a sweep's kind, or its x and y axes, not both")
    if "base" not in data or data["base"] is None:
        raise OptionsError("a sweep needs a base: a model, a finished merge or a recipe")
    try:
        return Sweep.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "sweep"
        raise OptionsError(f"invalid sweep at {where}: {first['msg']}") from None


@dataclass(frozen=True)
class Source:
    """A resolved base or candidate: how it is labelled and its recipe."""

    label: str
    recipe: Recipe


@dataclass(frozen=True)
class Cell:
    label: str  # the grid column's header (x), or "x · y" in a table
    x: str
    y: str | None
    model_name: str  # the infotext's Model
    recipe: Recipe
    source: dict[str, Any]  # what the variant is: {"x": ..., "y": ...} (for provenance)


@dataclass(frozen=True)
class Expanded:
    cells: list[Cell]  # row by row: len(rows) rows of len(columns)
    columns: list[str]
    rows: list[str] | None  # None: one axis
    anchor: Recipe | None  # the recipe whose sums the variants are derived from


Change = tuple[str, Callable[[dict[str, Any]], dict[str, Any]], Any]  # (label, edit of recipe data, what)


def expand(sweep: Sweep, base: Source, candidates: Callable[[Axis], Sequence[Source]], architecture: str,
           leaf_label: Callable[[Any], str | None] = lambda leaf: None) -> Expanded:
    """Every variant's recipe, in grid order. `candidates(axis)` resolves a swap axis' candidates;
    `architecture` is the base's (SDXL's text_encoder axis swaps both text encoders);
    `leaf_label` may name a leaf of the base (a registry's name for a sha256) for the headers."""
    data = base.recipe.model_dump(mode="json", exclude_defaults=False)
    if sweep.derived:
        data["output"] = {**data.get("output", {}), "accumulate": "fp64"}
    axes = [_changes(axis, data, candidates, architecture, leaf_label) for axis in sweep.axes]
    xs, ys = axes[0], axes[1] if len(axes) > 1 else [None]
    cells = []
    for y in ys:
        for x in xs:
            edited = x[1](data)
            if y is not None:
                edited = y[1](edited)
            label = x[0] if y is None else f"{x[0]} · {y[0]}"
            edited["name"] = None
            try:
                recipe = Recipe.model_validate(edited)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "recipe"
                raise RecipeError(f"sweep variant {label!r} is not a valid recipe at {where}: {first['msg']}") from None
            source = {"x": x[2]} if y is None else {"x": x[2], "y": y[2]}
            cells.append(Cell(label if y is None else x[0], x[0], None if y is None else y[0],
                              f"{base.label} ({label})", recipe, source))
    anchor = Recipe.model_validate({**data, "name": None}) if sweep.derived else None
    return Expanded(cells, [x[0] for x in xs], None if ys == [None] else [y[0] for y in ys], anchor)


def _changes(axis: Axis, base: dict[str, Any], candidates: Callable[[Axis], Sequence[Source]],
             architecture: str, leaf_label: Callable[[Any], str | None]) -> list[Change]:
    if axis.kind in SWAPS:
        components = [axis.kind]
        if axis.kind == "text_encoder" and architecture == "sdxl":
            components.append("text_encoder_2")
        return [_swap(components, candidate, SWAPS[axis.kind]) for candidate in candidates(axis)]
    if axis.kind == "leave_one_out":
        return _leave_one_out(axis.at, base, leaf_label)
    assert axis.path is not None
    _number_at(base, axis.path)  # a clear error now, before any variant
    return [(f"{axis.path} = {value:g}", _setter(axis.path, value), {"path": axis.path, "value": value})
            for value in axis.numbers()]


def _swap(components: list[str], candidate: Source, short: str) -> Change:
    sources = {c: component_source(candidate.recipe, c) for c in components}

    def edit(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "components": {**data.get("components", {}), **sources}}

    return f"{short}: {candidate.label}", edit, {"kind": components[0], "candidate": candidate.label}


def component_source(recipe: Recipe, component: str) -> Any:
    """Where `recipe` takes `component` from, as recipe JSON."""
    data = recipe.model_dump(mode="json")
    return data["components"].get(component, data["merge"])


def _leave_one_out(at: str, base: dict[str, Any], leaf_label: Callable[[Any], str | None]) -> list[Change]:
    node = _get(base, at)
    if not isinstance(node, dict) or node.get("method") not in ("uniform", "weighted"):
        raise OptionsError(f"leave_one_out needs a uniform or weighted merge at {at!r} of the base; "
                           f"it holds {_describe(node)}")
    models = node["models"]
    if len(models) < 2:
        raise OptionsError(f"leave_one_out needs at least 2 models at {at!r}; it has {len(models)}")
    changes: list[Change] = [(f"all {len(models)}", lambda data: data, {"all": len(models)})]
    seen: dict[str, int] = {}
    for j, item in enumerate(models):
        name = _leaf_label(item, f"{at}.models.{j}", leaf_label)
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name} #{seen[name]}"

        def edit(data: dict[str, Any], j: int = j) -> dict[str, Any]:
            inner = _get(data, at)
            return _put(data, _parts(at), {**inner, "models": inner["models"][:j] + inner["models"][j + 1:]})

        changes.append((f"without {label}", edit, {"without": label, "index": j}))
    return changes


def _leaf_label(item: Any, fallback: str, named: Callable[[Any], str | None]) -> str:
    if isinstance(item, dict) and "model" in item and "method" not in item:
        item = item["model"]
    if (isinstance(item, str) or (isinstance(item, dict) and "method" not in item)) and (name := named(item)):
        return name
    if isinstance(item, str):
        return Path(item).stem if item.endswith((".safetensors", ".ckpt")) else item
    if isinstance(item, dict) and "method" not in item:
        return item.get("name") or f"sha256:{str(item.get('sha256'))[:10]}"
    return fallback


def _describe(value: Any) -> str:
    if isinstance(value, dict) and "method" in value:
        return f"a {value['method']} node"
    return "a single model" if isinstance(value, str | dict) else "nothing"


def _parts(path: str) -> list[str | int]:
    if not path or any(not part for part in path.split(".")):
        raise OptionsError(f"bad path {path!r}: dotted names and indexes, e.g. merge.models.2.weight")
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def _get(data: Any, path: str | list[str | int]) -> Any:
    parts = _parts(path) if isinstance(path, str) else path
    node = data
    for part in parts:
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            node = node[part]
        else:
            where = ".".join(map(str, parts))
            raise OptionsError(f"the base recipe has nothing at {where!r} (stopped at {part!r})")
    return node


def _put(data: Any, parts: list[str | int], value: Any) -> Any:
    """A copy of `data` with the value at `parts` (which exists) replaced; the rest is shared."""
    if not parts:
        return value
    head, rest = parts[0], parts[1:]
    if isinstance(data, list):
        return [_put(v, rest, value) if i == head else v for i, v in enumerate(data)]
    return {**data, head: _put(data[head], rest, value)}


def _number_at(data: dict[str, Any], path: str) -> None:
    parts = _parts(path)
    if parts[-1] == "weight" and len(parts) >= 3 and parts[-3] == "models":
        owner = _get(data, parts[:-3])
        if isinstance(owner, dict) and owner.get("method") == "uniform":
            raise OptionsError(f"{path!r} is in a uniform merge, which has no weights: write it as "
                               '{"method": "weighted", ...} to sweep one')
        if _bare_weighted_item(data, parts):
            return  # a model given without its weight (1): the sweep gives it one
    value = _get(data, parts)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionsError(f"{path!r} of the base recipe is {_describe(value)}, not a number")


def _bare_weighted_item(data: dict[str, Any], parts: list[str | int]) -> bool:
    """`parts` is <node>.models.<i>.weight of a weighted node whose item i is a bare source."""
    if len(parts) < 3 or parts[-3] != "models" or not isinstance(parts[-2], int):
        return False
    owner = _get(data, parts[:-3])
    if not isinstance(owner, dict) or owner.get("method") != "weighted":
        return False
    item = _get(data, parts[:-1])
    return not (isinstance(item, dict) and "model" in item and "method" not in item)


def _setter(path: str, value: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
    parts = _parts(path)

    def edit(data: dict[str, Any]) -> dict[str, Any]:
        if parts[-1] == "weight" and _bare_weighted_item(data, parts):
            return _put(data, parts[:-1], {"model": _get(data, parts[:-1]), "weight": value})
        _get(data, parts)
        return _put(data, parts, value)

    return edit
