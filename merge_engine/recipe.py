"""The recipe: one frozen, validated document shared by the CLI, the API body and stored JSON.

A recipe says which source each component comes from. A source is a model reference (copy
that component) or a method node over sources. Validators raise `ValueError` so pydantic
reports the field path (the API turns that into a 422).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from . import jsonsafe, labels
from .errors import RecipeError
from .methods import METHODS, MethodNode, WeightedInput

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
ComponentName = Literal["unet", "text_encoder", "text_encoder_2", "vae"]
DType = Literal["fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2"]
ALIASES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}  # SDXL's two encoders (SD1's is a CLIP-L)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelLeaf(_Frozen):
    """A checkpoint identified by content: how canonical recipes and A1111 conversions name leaves."""

    sha256: str | None = Field(default=None, description="full sha256 hex of the file")
    name: str | None = Field(default=None, description="file name, used when no sha256 matches")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.lower()
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError("sha256 must be 64 hex digits")
        return value

    @model_validator(mode="after")
    def _some_identity(self) -> ModelLeaf:
        if self.sha256 is None and not self.name:
            raise ValueError("a model leaf needs a sha256 or a name")
        return self

    def label(self) -> str:
        return self.name or f"sha256:{self.sha256}"


ModelRef = Annotated[str, Field(min_length=1, description="a file path, a name, or sha256:<hex>")]


def _source_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "ref"
    if isinstance(value, BaseModel):
        return getattr(value, "method", None) or "leaf"
    if isinstance(value, dict):
        if "method" in value:
            return value["method"] if value["method"] in METHODS else "unknown_method"
        return "leaf"
    return None


# A source: a model reference, a content-identified leaf, or any registered method's node.
Source = Annotated[
    Union[  # noqa: UP007 - built from the registry, one tagged member per method
        (Annotated[ModelRef, Tag("ref")], Annotated[ModelLeaf, Tag("leaf")],
         *(Annotated[m.node, Tag(name)] for name, m in METHODS.items()))
    ],
    Discriminator(
        _source_kind,
        custom_error_type="invalid_source",
        custom_error_message="a source is a model reference or an object with a known 'method'",
    ),
]
Leaf = str | ModelLeaf
for _node in (WeightedInput, *(m.node for m in METHODS.values())):
    _node.model_rebuild(_types_namespace={"Source": Source, "WeightedInput": WeightedInput})


RESERVED_METADATA = ("format", "sdmerge_version", "sdmerge_recipe", "sdmerge_recipe_hash", "sdmerge_inputs",
                     "sd_merge_recipe", "sd_merge_models", *labels.RESERVED)
MAX_METADATA_BYTES = 1 << 20


class OutputOptions(_Frozen):
    dtype: DType = "fp16"
    accumulate: Literal["fp32", "fp64"] = "fp32"
    non_finite: Literal["error", "keep"] = Field(
        default="error", description="what to do with NaN/Inf in an input tensor"
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, description="more text entries for the output's safetensors metadata (e.g. "
                                          "modelspec.title, or sdmerge_study: the selection study behind the recipe)")
    component_dtypes: dict[ComponentName, DType] = Field(
        default_factory=dict, description="a dtype per component, over `dtype` (e.g. {\"unet\": \"fp8_e4m3fn\"})")
    components: list[ComponentName] | None = Field(
        default=None, min_length=1, description="write only these components (a text-encoder- or VAE-only file); "
                                                "a VAE alone is written as a standalone VAE, without first_stage_model.")
    drop_keys: list[str] = Field(default_factory=list, description="regular expressions: keys that match one are "
                                                                 "not written (re.search)")
    modelspec: bool = Field(default=True, description="write the ModelSpec labels (modelspec.*: architecture, title, "
                                                      "resolution, prediction_type, merged_from, hash_sha256)")
    ema: Literal["drop", "keep"] = Field(default="drop", description="EMA weights (model_ema.*): drop them, or keep "
                                                                    "them, merged as the UNet is")

    @field_validator("component_dtypes", mode="before")
    @classmethod
    def _dtype_aliases(cls, value: Any) -> Any:
        return {ALIASES.get(k, k): v for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("components", mode="before")
    @classmethod
    def _component_aliases(cls, value: Any) -> Any:
        return [ALIASES.get(v, v) if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("components")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a component is named twice")
        return value

    @field_validator("drop_keys")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern or len(pattern) > 1000:
                raise ValueError("a drop_keys pattern is 1 to 1000 characters")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"drop_keys pattern {pattern!r} is not a regular expression: {exc}") from None
        return value

    @field_validator("metadata")
    @classmethod
    def _own_keys(cls, value: dict[str, str]) -> dict[str, str]:
        taken = sorted(set(value) & set(RESERVED_METADATA))
        if taken:
            raise ValueError(f"metadata keys {', '.join(taken)} are written by sdmerge itself")
        if any(not key or len(key) > 256 for key in value):
            raise ValueError("metadata keys must be 1 to 256 characters")
        if sum(len(k) + len(v) for k, v in value.items()) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata holds more than {MAX_METADATA_BYTES} characters")
        return value

    @model_serializer(mode="wrap")
    def _without_empty_metadata(self, handler: Any) -> dict[str, Any]:
        # A recipe without metadata keeps the canonical form (and hash) it had before the field.
        data = handler(self)
        for name in ("metadata", "component_dtypes", "components", "drop_keys"):
            if not data.get(name):
                data.pop(name, None)
        for name, default in (("modelspec", True), ("ema", "drop")):
            if data.get(name) == default:
                data.pop(name, None)
        return data


class Recipe(_Frozen):
    name: str | None = Field(default=None, max_length=200)
    merge: Source
    components: dict[ComponentName, Source] = Field(default_factory=dict)
    output: OutputOptions = OutputOptions()

    @field_validator("components", mode="before")
    @classmethod
    def _aliases(cls, value: Any) -> Any:
        """clip_l and clip_g name SDXL's text encoders as users do."""
        if not isinstance(value, dict):
            return value
        named = {ALIASES.get(k, k): v for k, v in value.items()}
        if len(named) != len(value):
            raise ValueError("a component is named twice (clip_l is text_encoder, clip_g text_encoder_2)")
        return named

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c in value for c in "/\\\0")):
            raise ValueError("name must be non-empty and hold no path separators")
        return value

    def canonical_json(self) -> str:
        return canonical_json(self.model_dump(mode="json"))

    def recipe_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


Recipe.model_rebuild()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


MAX_LEAF_REFERENCES = 10_000  # model references in one recipe, repeats included
MAX_DISTINCT_LEAVES = 1_000  # distinct models; the largest community soups have about 200


def parse_recipe(data: Mapping[str, Any] | str | bytes) -> Recipe:
    """Validate a recipe from JSON text or a decoded object; errors become `RecipeError`.
    Its size is bounded before pydantic builds anything (see `check_recipe_size`)."""
    what = "the recipe (a weighted or uniform merge takes any number of models: flatten chains)"
    if isinstance(data, str | bytes):
        data = jsonsafe.loads(data, what=what, error=RecipeError)
    else:
        jsonsafe.check_depth(data, what=what, error=RecipeError)
    check_recipe_size(data)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(p) for p in first["loc"]) or "recipe"
        raise RecipeError(
            f"invalid recipe at {path}: {first['msg']}",
            details={"errors": json.loads(exc.json(include_url=False, include_input=False))},
        ) from None


def check_recipe_size(data: Any) -> None:
    """Refuse a recipe (decoded JSON, not yet validated) with more model references than
    `MAX_LEAF_REFERENCES` or more distinct models than `MAX_DISTINCT_LEAVES`, walking it without
    recursion: a 100 MB body of millions of references fails here, in milliseconds."""
    if not isinstance(data, Mapping):
        return
    components = data.get("components")
    stack = [data.get("merge"), *(components.values() if isinstance(components, Mapping) else ())]
    references, distinct = 0, set()
    while stack:
        source = stack.pop()
        if isinstance(source, Mapping) and "method" in source:
            method = METHODS.get(source["method"]) if isinstance(source["method"], str) else None
            for name in method.node.INPUTS if method else ():
                value = source.get(name)
                for item in value if isinstance(value, list) else (value,):
                    stack.append(item["model"] if isinstance(item, Mapping) and "method" not in item
                                 and "model" in item else item)
            continue
        if isinstance(source, str):
            leaf: Any = source
        elif isinstance(source, Mapping):
            leaf = (str(source.get("sha256")), str(source.get("name")))
        else:
            continue
        references += 1
        distinct.add(leaf)
        if references > MAX_LEAF_REFERENCES:
            raise RecipeError(f"the recipe references models more than {MAX_LEAF_REFERENCES} times",
                              details={"max_references": MAX_LEAF_REFERENCES})
        if len(distinct) > MAX_DISTINCT_LEAVES:
            raise RecipeError(f"the recipe names more than {MAX_DISTINCT_LEAVES} distinct models",
                              details={"max_models": MAX_DISTINCT_LEAVES})


def iter_leaves(source: Source) -> Iterator[Leaf]:
    if isinstance(source, MethodNode):
        for child in source.sources():
            yield from iter_leaves(child)
    else:
        yield source


def all_leaves(recipe: Recipe) -> list[Leaf]:
    """Every distinct leaf, in first-use order, `merge` first."""
    seen: dict[Any, None] = {}
    for source in (recipe.merge, *recipe.components.values()):
        for leaf in iter_leaves(source):
            seen.setdefault(leaf, None)
    return list(seen)


def map_leaves(source: Source, fn: Callable[[Leaf], Any]) -> Any:
    """The source as JSON-ready data with every leaf replaced by `fn(leaf)`."""
    if isinstance(source, MethodNode):
        return source.map_sources(lambda child: map_leaves(child, fn))
    return fn(source)


def rewrite_leaves(recipe: Recipe, fn: Callable[[Leaf], Any]) -> Recipe:
    """A new recipe whose leaves are `fn(leaf)` (e.g. paths replaced by sha256 and file name)."""
    data = recipe.model_dump(mode="json")
    data["merge"] = map_leaves(recipe.merge, fn)
    data["components"] = {c: map_leaves(s, fn) for c, s in recipe.components.items()}
    return Recipe.model_validate(data)


def recipe_schema(ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
    """The recipe's JSON Schema, its source union named once (`Source`) and referenced from every
    method's inputs: inlined, each of a dozen recursive members expands into every other, and
    documentation renderers (ReDoc) never finish."""
    schema = Recipe.model_json_schema(ref_template=ref_template)
    union = schema["properties"]["merge"]
    ref = {"$ref": ref_template.format(model="Source")}
    members = union["oneOf"]

    def named(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("oneOf") == members:
                return {**ref, **{k: v for k, v in node.items() if k in ("title", "description")}}
            return {k: named(v) for k, v in node.items()}
        if isinstance(node, list):
            return [named(v) for v in node]
        return node

    schema = named(schema)
    schema["$defs"]["Source"] = {"title": "Source", "oneOf": members,
                                 "description": "a model reference, a {sha256, name} leaf, or a method over sources"}
    return schema
