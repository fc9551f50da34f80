"""LoRA baking as a linear method: `model + sum(strength * delta)`, each LoRA file an input whose
tensors are its deltas (lora.py computes them from the file's factors, key by key, as they are
read). Written once for tensors; on linear forms it flattens like every other linear method, so
a LoRA's strength may be given per block and a baked model mixes into any recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .linear import Weight
from .registry import MethodNode, merge_method

if TYPE_CHECKING:
    from ..recipe import Source


@dataclass(frozen=True)
class LoraLeaf:
    """A LoRA file in a recipe's leaves: the reference as written (a path, a name, sha256:…, or
    a {sha256, name} leaf), kept apart from checkpoint leaves so the planner opens it as deltas."""

    ref: Any

    def label(self) -> str:
        return self.ref if isinstance(self.ref, str) else self.ref.label()


class LoraInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    lora: Any = Field(description="the LoRA file: a path, a name, sha256:<hex>, or {sha256, name}",
                      json_schema_extra={"anyOf": [
                          {"type": "string", "minLength": 1},
                          {"type": "object", "properties": {"sha256": {"type": "string"}, "name": {"type": "string"}},
                           "additionalProperties": False}]})
    strength: Weight = Field(default=1.0, description="the LoRA's weight; per block, e.g. "
                                                     "{\"blocks\": {\"BASE\": 0}, \"default\": 1} for the UNet only")

    @field_validator("lora", mode="before")
    @classmethod
    def _reference(cls, value: Any) -> Any:
        from ..recipe import ModelLeaf

        if isinstance(value, dict):
            return ModelLeaf.model_validate(value)
        if isinstance(value, ModelLeaf) or (isinstance(value, str) and value):
            return value
        raise ValueError("a LoRA is a file reference or a {sha256, name} leaf")

    def leaf(self) -> LoraLeaf:
        return LoraLeaf(self.lora)


class Lora(MethodNode):
    """model + sum(strength * LoRA delta): LoRA, LoCon, LoHa and LoKr files baked into a checkpoint."""

    INPUTS = ("model", "loras")
    method: Literal["lora"]
    model: Source
    loras: list[LoraInput] = Field(min_length=1)

    def sources(self) -> list[Any]:
        return [self.model, *(i.leaf() for i in self.loras)]

    def map_sources(self, fn):
        return {"method": "lora", "model": fn(self.model),
                "loras": [{"lora": _reference(fn(i.leaf())), "strength": i.strength} for i in self.loras]}

    def arguments(self, evaluate, number):
        return {"model": evaluate(self.model), "deltas": [evaluate(i.leaf()) for i in self.loras],
                "strengths": [number(i.strength) for i in self.loras]}


def _reference(value: Any) -> Any:
    return value.ref if isinstance(value, LoraLeaf) else value


@merge_method(Lora, linear=True)
def lora(model: Any, deltas: list[Any], strengths: list[Any]) -> Any:
    """model + the sum of each LoRA's delta times its strength."""
    total = model
    for delta, strength in zip(deltas, strengths, strict=True):
        total = total + delta * strength
    return total
