"""Merge methods: plain functions over anything that adds and scales, in one registry.

Each method is written once, for tensors. Because every method here is linear, the same
function applied to `LinearForm`s (exact rational combinations of leaf checkpoints) yields the
method's coefficients, so any recipe tree flattens to one weighted sum per component and is
computed in a single pass. A 0.5 binary tree and a flat uniform average of the same leaves
therefore produce the same coefficients, and the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from fractions import Fraction
from typing import Any

from .errors import RecipeError
from .recipe import AddDifference, ModelLeaf, Source, Uniform, Weighted

METHODS: dict[str, Callable[..., Any]] = {}


def merge_method(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        METHODS[name] = fn
        return fn

    return register


@merge_method("uniform")
def uniform(models: list[Any]) -> Any:
    return _sum(models) / len(models)


@merge_method("weighted")
def weighted(models: list[Any], weights: list[Any], normalize: bool = True) -> Any:
    total = _sum(w * m for w, m in zip(weights, models, strict=True))
    return total / sum(weights) if normalize else total


@merge_method("add_difference")
def add_difference(a: Any, b: Any, c: Any, alpha: Any = 1) -> Any:
    return a + (b - c) * alpha


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


def exact(value: float) -> Fraction:
    """A recipe number as the decimal the user wrote: 0.1 is one tenth, not its binary neighbour."""
    return Fraction(repr(value))


def flatten(source: Source) -> dict[Hashable, Fraction]:
    """The source as {leaf: coefficient}, leaves in first-use order, zero coefficients dropped."""
    terms = _form(source).terms
    nonzero = {leaf: c for leaf, c in terms.items() if c != 0}
    if not nonzero:
        raise RecipeError("the recipe's weights cancel out: every model has weight zero")
    return nonzero


def _form(source: Source) -> LinearForm:
    if isinstance(source, str | ModelLeaf):
        return LinearForm.leaf(source)
    if isinstance(source, Uniform):
        return METHODS["uniform"]([_form(m) for m in source.models])
    if isinstance(source, Weighted):
        inputs = source.inputs()
        return METHODS["weighted"](
            [_form(i.model) for i in inputs], [exact(i.weight) for i in inputs], source.normalize
        )
    if isinstance(source, AddDifference):
        return METHODS["add_difference"](
            _form(source.a), _form(source.b), _form(source.c), exact(source.alpha)
        )
    raise RecipeError(f"unknown source {source!r}")
