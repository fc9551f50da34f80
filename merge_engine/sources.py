"""A component's source resolved into how each of its keys is evaluated.

A linear source is exact leaf coefficients; a source holding a non-linear method is a `Sum` of
inputs and `Apply` nodes. Where a parameter is given per block (blocks.py), the coefficients (or
the method's parameters) differ from key to key: `ComponentSource.at(key)` resolves every block
map for that key, once per distinct set of values (a few dozen blocks, not thousands of keys).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from pydantic import BaseModel

from .blocks import BlockWeights, check_architecture, resolve
from .errors import RecipeError
from .methods import Applied, MethodNode, exact, flatten
from .recipe import Source, iter_leaves

Coefficients = tuple[tuple[int, Fraction], ...]  # (input index, exact weight)


@dataclass(frozen=True)
class Apply:
    """A non-linear method over its inputs, each a `Sum` (or a list of them, or None)."""

    method: str
    params: tuple[tuple[str, Any], ...]
    inputs: tuple[tuple[str, Sum | tuple[Sum, ...] | None], ...]

    def describe(self) -> dict[str, Any]:
        def one(value: Any) -> Any:
            return [v.describe() for v in value] if isinstance(value, tuple) else (
                None if value is None else value.describe())
        return {"method": self.method, **dict(self.params), **{n: one(v) for n, v in self.inputs}}


@dataclass(frozen=True)
class Sum:
    """sum(coefficient * part), a part being an input (its index in `Plan.inputs`) or an `Apply`:
    how a key is evaluated where its component's recipe holds a non-linear method."""

    parts: tuple[tuple[int | Apply, float], ...]

    def describe(self) -> Any:
        def one(part: int | Apply) -> Any:
            return part.describe() if isinstance(part, Apply) else {"input": part}
        if len(self.parts) == 1 and self.parts[0][1] == 1.0:
            return one(self.parts[0][0])
        return {"sum": [{"weight": c, **{"of": one(p)}} for p, c in self.parts]}


@dataclass
class Evaluation:
    """One key's evaluation: its weighted sum, or (non-linear) the inputs it reads and its `Sum`."""

    coefficients: Coefficients
    weights: dict[int, float]
    expression: Sum | None


class ComponentSource:
    """A component's source over the plan's inputs (`index_of`: leaf -> input index)."""

    def __init__(self, source: Source, index_of: dict[Hashable, int], where: str,
                 architecture: str | None):
        self.source = source
        self.index_of = index_of
        self.mapped = list(block_maps(source, where))
        for path, weights in self.mapped:
            check_architecture(weights, architecture, path)
        self.inputs: Coefficients = (
            tuple((i, Fraction(0)) for i in dict.fromkeys(index_of[leaf] for leaf in iter_leaves(source)))
            if self.mapped else self._evaluate({}).coefficients)
        self._fixed = None if self.mapped else self._evaluate({})
        self._by_values: dict[tuple[float, ...], Evaluation] = {}
        self.groups: dict[str, dict[tuple, list[str]]] = {}  # component -> (values, labels) -> keys

    @property
    def varies(self) -> bool:
        return bool(self.mapped)

    @property
    def expression(self) -> Sum | None:
        """The component's evaluation where it is the same for every key."""
        return self._fixed.expression if self._fixed else None

    def at(self, component: str, key: str) -> Evaluation:
        if self._fixed is not None:
            return self._fixed
        resolved = [resolve(weights, component, key, path) for path, weights in self.mapped]
        values = tuple(value for value, _ in resolved)
        found = self._by_values.get(values)
        if found is None:
            value_of = {id(weights): value for (_, weights), value in zip(self.mapped, values, strict=True)}
            try:
                found = self._evaluate(value_of)
            except RecipeError as exc:
                raise RecipeError(f"{exc.message} (with the block values of key {key})", component=component,
                                  key=key, details=exc.details) from None
            self._by_values[values] = found
        labels = tuple(label for _, label in resolved)
        self.groups.setdefault(component, {}).setdefault((values, labels), []).append(key)
        return found

    def _evaluate(self, value_of: dict[int, float]) -> Evaluation:
        def value(v: Any) -> Any:
            return value_of[id(v)] if isinstance(v, BlockWeights) else v

        def number(v: Any) -> Fraction:
            return exact(value(v))

        flat = flatten(self.source, number)
        if not any(isinstance(leaf, Applied) for leaf in flat):
            coefficients = _terms(flat, self.index_of)
            return Evaluation(coefficients, {i: float(c) for i, c in coefficients}, None)
        used = dict.fromkeys(self.index_of[leaf] for leaf in iter_leaves(self.source))
        expression = _sum(flat, self.index_of, number, value)
        return Evaluation(tuple((i, Fraction(0)) for i in used), dict.fromkeys(used, 0.0), expression)

    def describe(self, component: str, names: list[str]) -> dict[str, Any]:
        """The block-mapped values, and what each distinct set of them evaluates to, for the plan."""
        groups, planned = [], self.groups.get(component, {})
        for (values, labels), keys in planned.items():
            found = self._by_values[values]
            entry: dict[str, Any] = {
                "set_by": dict(zip((p for p, _ in self.mapped), labels, strict=True)),
                "values": dict(zip((p for p, _ in self.mapped), values, strict=True)),
                "keys": len(keys), "example_key": keys[0],
            }
            if found.expression is not None:
                entry["evaluation"] = found.expression.describe()
            else:
                entry["sources"] = [{"model": names[i], "weight": float(c), "exact_weight": str(c)}
                                    for i, c in found.coefficients]
            groups.append(entry)
        overrides = [{"field": path, "keys": o.keys, "value": o.value,
                      "matched": sum(1 for keys in planned.values() for k in keys
                                     if _last_override(weights, k) == n)}
                     for path, weights in self.mapped for n, o in enumerate(weights.overrides)]
        return {"fields": [path for path, _ in self.mapped], "groups": groups, "overrides": overrides}


def _last_override(weights: BlockWeights, key: str) -> int | None:
    return weights.value_at(None, key)[1]


def block_maps(source: Any, where: str) -> Iterator[tuple[str, BlockWeights]]:
    """Every block map in a source tree, with the field path that holds it."""
    if isinstance(source, MethodNode):
        where = f"{where}.{source.method}"
    if isinstance(source, BlockWeights):
        yield where, source
    elif isinstance(source, BaseModel):
        for name in type(source).model_fields:
            yield from block_maps(getattr(source, name), f"{where}.{name}")
    elif isinstance(source, list):
        for n, item in enumerate(source):
            yield from block_maps(item, f"{where}.{n}")


def _sum(flat: dict[Hashable, Fraction], index_of: dict[Hashable, int], number: Any, value: Any) -> Sum:
    parts: list[tuple[int | Apply, float]] = []
    for (leaf, c) in [*_terms({k: v for k, v in flat.items() if not isinstance(k, Applied)}, index_of),
                      *((k, v) for k, v in flat.items() if isinstance(k, Applied))]:
        parts.append((_apply(leaf.node, index_of, number, value) if isinstance(leaf, Applied) else leaf, float(c)))
    return Sum(tuple(parts))


def _apply(node: MethodNode, index_of: dict[Hashable, int], number: Any, value: Any) -> Apply:
    def compiled(source: Any) -> Any:
        if source is None:
            return None
        if isinstance(source, list):
            return tuple(_sum(flatten(v, number), index_of, number, value) for v in source)
        return _sum(flatten(source, number), index_of, number, value)
    inputs = tuple((name, compiled(getattr(node, name))) for name in node.INPUTS)
    return Apply(node.method, tuple((n, value(v)) for n, v in node.params().items()), inputs)


def _terms(flat: dict[Hashable, Fraction], index_of: dict[Hashable, int]) -> Coefficients:
    merged: dict[int, Fraction] = {}
    for leaf, c in flat.items():  # two references to one file add up
        merged[index_of[leaf]] = merged.get(index_of[leaf], Fraction(0)) + c
    return tuple((i, c) for i, c in merged.items() if c != 0)
