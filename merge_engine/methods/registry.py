"""The method registry: one entry per method, read by the recipe, the planner and the executor.

An entry holds the method's node model (a pydantic model of its inputs and parameters, so the
API's 422s and the JSON Schema come from it), whether it is linear, and its tensor function,
which the decorator returns unchanged so tests call it directly. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ..blocks import BlockWeights

Evaluate = Callable[[Any], Any]  # a source -> its value (a tensor, a linear form, an expression)


class MethodNode(BaseModel):
    """A method applied to sources. Subclasses declare `method: Literal[name]`, their input
    fields (named in INPUTS: a source, an optional source, or a list of sources) and their
    parameters (every other field), with pydantic constraints for the parameters' ranges."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    INPUTS: ClassVar[tuple[str, ...]] = ()

    method: str

    def sources(self) -> list[Any]:
        """Every input source, in order."""
        found: list[Any] = []
        for name in self.INPUTS:
            value = getattr(self, name)
            if isinstance(value, list):
                found += value
            elif value is not None:
                found.append(value)
        return found

    def params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields
                if name != "method" and name not in self.INPUTS}

    def map_sources(self, fn: Evaluate) -> dict[str, Any]:
        """The node as JSON-ready data with every input source replaced by `fn(source)`."""
        data: dict[str, Any] = {"method": self.method}
        for name in self.INPUTS:
            value = getattr(self, name)
            if isinstance(value, list):
                data[name] = [fn(v) for v in value]
            elif value is not None:
                data[name] = fn(value)
        data.update(self.params())
        return data

    def arguments(self, evaluate: Evaluate, number: Callable[[float], Any]) -> dict[str, Any]:
        """Keyword arguments for the method's function: inputs evaluated, float parameters through
        `number` (exact fractions when a linear method runs on linear forms; the planner's `number`
        also resolves a block map to the value of the key being planned)."""
        args: dict[str, Any] = {}
        for name in self.INPUTS:
            value = getattr(self, name)
            args[name] = [evaluate(v) for v in value] if isinstance(value, list) else (
                None if value is None else evaluate(value))
        for name, value in self.params().items():
            args[name] = number(value) if isinstance(value, float | BlockWeights) else value
        return args


@dataclass(frozen=True)
class Method:
    name: str
    node: type[MethodNode]
    fn: Callable[..., Any]
    linear: bool
    summary: str

    def __call__(self, node: MethodNode, evaluate: Evaluate, number: Callable[[float], Any] = float) -> Any:
        return self.fn(**node.arguments(evaluate, number))


METHODS: dict[str, Method] = {}


def merge_method(node: type[MethodNode], *, linear: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn` as the method its node model names; returns `fn` unchanged."""
    name = node.model_fields["method"].annotation.__args__[0]  # Literal["name"]

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        summary = (fn.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        METHODS[name] = Method(name, node, fn, linear, summary)
        node.__doc__ = node.__doc__ if node.__doc__ and node.__doc__ != MethodNode.__doc__ else summary
        return fn

    return register
