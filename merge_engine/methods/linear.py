"""Linear methods: plain functions over anything that adds and scales.

Each is written once, for tensors. Applied to `LinearForm`s (exact rational combinations of
leaves) the same function yields the method's coefficients, so a tree of linear methods flattens
to one weighted sum per component, computed in one pass: a 0.5 binary tree and a flat uniform
average of the same leaves give the same coefficients, and the same tensors. A non-linear node
inside a linear tree is one more leaf of the sum (`Applied`), evaluated per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..blocks import Number, blockwise, numbers
from ..errors import RecipeError
from .registry import METHODS, MethodNode, merge_method

if TYPE_CHECKING:  # the union of every method's node, built by recipe.py from the registry
    from ..recipe import Source


Finite = Number
Weight = blockwise(Finite)  # a number, or one per UNet block (blocks.py)


class WeightedInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: Source
    weight: Weight


class Uniform(MethodNode):
    INPUTS = ("models",)
    method: Literal["uniform"]
    models: list[Source] = Field(min_length=1)


class Weighted(MethodNode):
    INPUTS = ("models",)
    method: Literal["weighted"]
    models: list[WeightedInput | Source] = Field(min_length=1)
    normalize: bool = True

    @model_validator(mode="after")
    def _weights(self) -> Weighted:
        weights = [w for item in self.inputs() for w in numbers(item.weight)]
        if all(w == 0 for w in weights):
            raise ValueError("weights are all zero")
        if self.normalize and any(w < 0 for w in weights):
            raise ValueError("weights must not be negative (use add_difference for differences)")
        return self

    def inputs(self) -> list[WeightedInput]:
        return [m if isinstance(m, WeightedInput) else WeightedInput(model=m, weight=1.0) for m in self.models]

    def sources(self) -> list[Any]:
        return [i.model for i in self.inputs()]

    def map_sources(self, fn):
        return {"method": "weighted", "normalize": self.normalize,
                "models": [{"model": fn(i.model), "weight": i.weight} for i in self.inputs()]}

    def arguments(self, evaluate, number):
        inputs = self.inputs()
        return {"models": [evaluate(i.model) for i in inputs], "weights": [number(i.weight) for i in inputs],
                "normalize": self.normalize}


class AddDifference(MethodNode):
    """a + alpha * (b - c): graft what b learned over c onto a."""

    INPUTS = ("a", "b", "c")
    method: Literal["add_difference"]
    a: Source
    b: Source
    c: Source
    alpha: Weight = 1.0


class WeightedSum(MethodNode):
    """(1 - alpha) * a + alpha * b: the WebUI's weighted sum, and with alpha per block, its block merge."""

    INPUTS = ("a", "b")
    method: Literal["weighted_sum"]
    a: Source
    b: Source
    alpha: Weight = 0.5


class TaskArithmetic(MethodNode):
    """base + alpha * sum(model - base): task vectors added to a base (Ilharco et al., 2023)."""

    INPUTS = ("base", "models")
    method: Literal["task_arithmetic"]
    base: Source
    models: list[Source] = Field(min_length=1)
    alpha: Weight = 1.0


@merge_method(Uniform, linear=True)
def uniform(models: list[Any]) -> Any:
    """The plain average of the models."""
    return _sum(models) / len(models)


@merge_method(Weighted, linear=True)
def weighted(models: list[Any], weights: list[Any], normalize: bool = True) -> Any:
    """A weighted sum of the models, divided by the weights' sum when normalize is true."""
    total = _sum(w * m for w, m in zip(weights, models, strict=True))
    return total / sum(weights) if normalize else total


@merge_method(AddDifference, linear=True)
def add_difference(a: Any, b: Any, c: Any, alpha: Any = 1) -> Any:
    """a + alpha * (b - c)."""
    return a + (b - c) * alpha


@merge_method(WeightedSum, linear=True)
def weighted_sum(a: Any, b: Any, alpha: Any = 0.5) -> Any:
    """(1 - alpha) * a + alpha * b."""
    return a * (1 - alpha) + b * alpha


@merge_method(TaskArithmetic, linear=True)
def task_arithmetic(base: Any, models: list[Any], alpha: Any = 1) -> Any:
    """base + alpha * the sum of the task vectors (model - base)."""
    return base + _sum(m - base for m in models) * alpha


def _sum(items: Iterable[Any]) -> Any:
    items = iter(items)
    total = next(items)
    for item in items:
        total = total + item
    return total


class LinearForm:
    """sum(coefficient * leaf), with exact rational coefficients."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict[Hashable, Fraction]):
        self.terms = terms

    @classmethod
    def leaf(cls, leaf: Hashable) -> LinearForm:
        return cls({leaf: Fraction(1)})

    def __add__(self, other: LinearForm) -> LinearForm:
        terms = dict(self.terms)
        for leaf, c in other.terms.items():
            terms[leaf] = terms.get(leaf, Fraction(0)) + c
        return LinearForm(terms)

    def __sub__(self, other: LinearForm) -> LinearForm:
        return self + other * -1

    def __mul__(self, scalar: Fraction | int) -> LinearForm:
        return LinearForm({leaf: c * scalar for leaf, c in self.terms.items()})

    __rmul__ = __mul__

    def __truediv__(self, scalar: Fraction | int) -> LinearForm:
        return LinearForm({leaf: c / scalar for leaf, c in self.terms.items()})


class Applied:
    """A non-linear node as a leaf of a linear form: the same node object is the same leaf."""

    __slots__ = ("node",)

    def __init__(self, node: MethodNode):
        self.node = node

    def __hash__(self) -> int:
        return id(self.node)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Applied) and other.node is self.node

    def __repr__(self) -> str:
        return f"Applied({self.node.method})"


def exact(value: float) -> Fraction:
    """A recipe number as the decimal the user wrote: 0.1 is one tenth, not its binary neighbour."""
    return Fraction(repr(value))


def flatten(source: Any, number: Callable[[Any], Fraction] = exact) -> dict[Hashable, Fraction]:
    """The source as {leaf: coefficient}, leaves (model references, or `Applied` non-linear
    nodes) in first-use order, zero coefficients dropped. `number` turns a recipe number into an
    exact one (the planner's also resolves block maps for the key it plans)."""
    terms = _form(source, number).terms
    nonzero = {leaf: c for leaf, c in terms.items() if c != 0}
    if not nonzero:
        raise RecipeError("the recipe's weights cancel out: every model has weight zero")
    return nonzero


def _form(source: Any, number: Callable[[Any], Fraction]) -> LinearForm:
    if not isinstance(source, MethodNode):
        return LinearForm.leaf(source)
    method = METHODS[source.method]
    if not method.linear:
        return LinearForm.leaf(Applied(source))
    return method(source, lambda child: _form(child, number), number)
