"""Block weights: a method parameter given per UNet block (and per key glob) instead of once.

The WebUI block mergers give a weight per UNet block: IN00-IN11, M00, OUT00-OUT11 on SD1/SD2
(IN00-IN08, M00, OUT00-OUT08 on SDXL), a BASE for the text encoders and, in some, the VAE.
Which block a key belongs to, and where each convention puts `time_embed` and the final `out`
layer, is data (layouts/blocks.json). A recipe holds the named map (`BlockWeights`); the lists
users paste (25, 26, 27, 20 or 21 numbers) are imported by their count and stored named, with
the convention they came from. Elemental overrides set a value by key glob, the last match
winning. The planner resolves every map to one number per key (`resolve`), so methods only ever
see numbers and a block-weighted linear merge is still one exact weighted sum per key.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator
from fnmatch import fnmatchcase
from importlib import resources
from typing import Annotated, Any, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import RecipeError

MAX_OVERRIDES = 1000


@functools.cache
def _data() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("layouts/blocks.json").read_text())


@functools.cache
def block_names(architecture: str) -> tuple[str, ...]:
    """Every block name of an architecture, in the order the block mergers show them."""
    arch = _data()["architectures"][architecture]
    return ("BASE", *(f"IN{i:02d}" for i in range(arch["input"])), "M00",
            *(f"OUT{i:02d}" for i in range(arch["output"])), *arch["extra"], "VAE")


@functools.cache
def _rules() -> tuple[tuple[str, re.Pattern[str], str], ...]:
    return tuple((r["component"], re.compile(r["match"]), r["block"]) for r in _data()["rules"])


def all_block_names() -> set[str]:
    return {name for arch in _data()["architectures"] for name in block_names(arch)}


def conventions() -> dict[str, dict[str, Any]]:
    return _data()["conventions"]


def block_of(component: str, key: str) -> str | None:
    """The block a (canonical) key of a component belongs to; None for keys outside every block."""
    for rule_component, pattern, block in _rules():
        if rule_component == component and (found := pattern.search(key)):
            return block.format(*(int(g) for g in found.groups()))
    return None


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Number = Annotated[float, AfterValidator(_finite)]


class KeyOverride(BaseModel):
    """A value for every key matching a glob (`*attn2*`, `model.diffusion_model.out.*`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    keys: str = Field(min_length=1, max_length=500, description="a glob over full key names")
    value: Number


def _convention_for(count: int) -> str:
    found = [name for name, c in conventions().items() if count in _counts(c)]
    if not found:
        known = "; ".join(f"{'/'.join(map(str, _counts(c)))} values: {name} ({c['summary']})"
                          for name, c in conventions().items())
        raise ValueError(f"a block list of {count} values matches no convention. The conventions are: {known}")
    return found[0]


def _counts(convention: dict[str, Any]) -> tuple[int, ...]:
    full = len(convention["order"])
    return tuple(range(full - convention.get("optional_tail", 0), full + 1))


def import_list(values: list[Any], convention: str | None = None, base: Any = None) -> dict[str, Any]:
    """A pasted block list as a named map, by its count (or the convention named)."""
    name = convention or _convention_for(len(values))
    if name not in conventions():
        raise ValueError(f"unknown block convention {name!r} (known: {', '.join(conventions())})")
    spec = conventions()[name]
    if len(values) not in _counts(spec):
        raise ValueError(f"the {name} convention takes {' or '.join(map(str, _counts(spec)))} values, "
                         f"not {len(values)} ({spec['summary']})")
    blocks = dict(zip(spec["order"], values, strict=False))
    if base is not None:
        if "base" not in spec:
            raise ValueError(f"base is the separate base alpha of the kohya convention; a {name} list holds its own BASE")
        blocks.update(dict.fromkeys(spec["base"], base))
    for target, source in spec["place"].items():
        if source in blocks:
            blocks[target] = blocks[source]
    return {"blocks": blocks, "convention": name}


class BlockWeights(BaseModel):
    """A parameter's value per block, with a default and key-glob overrides (the last match wins).
    A JSON list of 25, 26, 27, 20 or 21 numbers is read as the block merger convention with that
    count, or `{"list": [...], "convention": ..., "base": ...}` to name it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    blocks: dict[str, Number] = Field(default_factory=dict, description="block name -> value")
    default: Number | None = Field(default=None, description="the value of every block not named")
    overrides: list[KeyOverride] = Field(default_factory=list, max_length=MAX_OVERRIDES,
                                         description="values by key glob, applied in order: the last match wins")
    convention: str | None = Field(default=None, description="the block list convention the map was imported from")

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            return import_list(value)
        if isinstance(value, dict) and "list" in value:
            rest = {k: v for k, v in value.items() if k not in ("list", "convention", "base")}
            if not isinstance(value["list"], list):
                raise ValueError("list must be a list of numbers")
            return {**import_list(value["list"], value.get("convention"), value.get("base")), **rest}
        return value

    @field_validator("blocks")
    @classmethod
    def _known_blocks(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - all_block_names())
        if unknown:
            raise ValueError(f"unknown block {unknown[0]!r}; blocks are BASE, IN00-IN11, M00, OUT00-OUT11, "
                             "TIME_EMBED, LABEL_EMB (SDXL), OUT and VAE")
        return value

    @model_validator(mode="after")
    def _something(self) -> BlockWeights:
        if not self.blocks and self.default is None and not self.overrides:
            raise ValueError("a block map needs blocks, a default or overrides")
        if self.convention is not None and self.convention not in conventions():
            raise ValueError(f"unknown block convention {self.convention!r} (known: {', '.join(conventions())})")
        return self

    @model_serializer(mode="wrap")
    def _compact(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v not in (None, [], {})}

    def values(self) -> Iterator[tuple[str, float]]:
        """Every number it holds, labelled (`block IN00`, `default`, `override *attn2*`)."""
        yield from ((f"block {name}", v) for name, v in self.blocks.items())
        if self.default is not None:
            yield "default", self.default
        yield from ((f"override {o.keys}", o.value) for o in self.overrides)

    def value_at(self, block: str | None, key: str) -> tuple[float | None, int | None]:
        """The value for `key` (in `block`) and the index of the override that set it, if any."""
        for index in range(len(self.overrides) - 1, -1, -1):
            if fnmatchcase(key, self.overrides[index].keys):
                return self.overrides[index].value, index
        if block is not None and block in self.blocks:
            return self.blocks[block], None
        return self.default, None


def _kind(value: Any) -> str:
    return "blocks" if isinstance(value, dict | list | BlockWeights) else "number"


def blockwise(number: Any) -> Any:
    """The type of a method parameter that may be given per block: `number` (a float type with its
    constraints) or a `BlockWeights` whose every value satisfies those constraints."""
    adapter = TypeAdapter(number)

    def each(weights: BlockWeights) -> BlockWeights:
        for label, value in weights.values():
            try:
                adapter.validate_python(value)
            except ValidationError as exc:
                raise ValueError(f"{label}: {exc.errors()[0]['msg']}") from None
        return weights

    return Annotated[
        Union[Annotated[number, Tag("number")],  # noqa: UP007 - a tagged union
              Annotated[BlockWeights, AfterValidator(each), Tag("blocks")]],
        Discriminator(_kind),
    ]


def numbers(value: Any) -> list[float]:
    """A parameter's numbers: itself, or every value of its block map."""
    return [v for _, v in value.values()] if isinstance(value, BlockWeights) else [value]


def check_architecture(weights: BlockWeights, architecture: str | None, where: str) -> None:
    """A block map used on `architecture` names only its blocks."""
    if architecture is None:
        raise RecipeError(f"{where}: block weights need models of a known architecture", details={"field": where})
    names = block_names(architecture)
    wrong = [name for name in weights.blocks if name not in names]
    if wrong:
        raise RecipeError(f"{where}: {architecture} has no block {wrong[0]} (its blocks: {', '.join(names)})",
                          details={"field": where, "block": wrong[0], "architecture": architecture})


def resolve(weights: BlockWeights, component: str, key: str, where: str) -> tuple[float, str]:
    """The number `weights` gives `key`, and what gave it (a block name, `default` or an override)."""
    block = block_of(component, key)
    value, override = weights.value_at(block, key)
    if value is None:
        raise RecipeError(
            f"{where}: no value for block {block or '(none)'} at key {key}; name the block or give a default"
            + (f" (the {weights.convention} list sets no {block})" if weights.convention else ""),
            component=component, key=key, details={"field": where, "block": block})
    return value, (f"override {weights.overrides[override].keys}" if override is not None else
                   block if block in weights.blocks else "default")
