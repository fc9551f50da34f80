"""Non-linear methods: their node models (inputs, parameters and ranges) and plain tensor functions.

Each function takes whole tensors and runs the method's streaming program (programs.py) over them
as one chunk; the engine runs the same program chunk by chunk over files. Formulas and papers:
docs/METHODS.md. Parameter names and defaults follow sd-mecha's, so recipes translate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from ..blocks import blockwise
from .linear import Weight
from .registry import MethodNode, merge_method

# Every float parameter may be given per UNet block (blocks.py), each value within the range.
Probability = blockwise(Annotated[float, Field(ge=0.0, le=1.0)])
Kept = blockwise(Annotated[float, Field(gt=0.0, le=1.0)])
Spread = blockwise(Annotated[float, Field(ge=-1.0, le=1.0)])
Positive = blockwise(Annotated[float, Field(gt=0.0)])
NonNegative = blockwise(Annotated[float, Field(ge=0.0)])

if TYPE_CHECKING:  # the union of every method's node, built by recipe.py from the registry
    from ..recipe import Source


class _TaskVectors(MethodNode):
    INPUTS = ("base", "models")
    base: Source
    models: list[Source] = Field(min_length=1)
    alpha: Weight = Field(1.0, description="scales the merged task vector added to the base")


class Ties(_TaskVectors):
    """TIES: top-k% of each task vector by magnitude, a sign elected per element, the agreeing
    deltas averaged (Yadav et al., 2023); optional DARE/DELLA dropout, geometric median or model stock."""

    method: Literal["ties"]
    k: Kept = Field(0.2, description="the fraction of each task vector kept, by magnitude")
    vote_sgn: bool = Field(False, description="elect signs by magnitude sum (true) or by sign count (false)")
    probability: Probability = Field(0.0, description="the probability of dropping each delta element (DARE)")
    della_eps: Spread = Field(0.0, description="DELLA: drop probabilities spread by magnitude rank")
    rescale: bool = Field(True, description="divide by 1 - probability after dropout")
    seed: int = Field(0, ge=0, lt=1 << 63, description="seeds the counter-based dropout")
    apply_median: bool = Field(False, description="merge the elected deltas by their geometric median")
    apply_stock: bool = Field(False, description="scale the merged deltas by model stock's ratio")
    cos_eps: Positive = Field(1e-6, description="model stock's cosine guard")
    eps: Positive = Field(1e-6, description="Weiszfeld's smallest distance")
    maxiter: int = Field(100, ge=0, le=100_000, description="Weiszfeld's iterations at most")
    ftol: NonNegative = Field(1e-20, description="Weiszfeld's relative tolerance")

    @model_validator(mode="after")
    def _one_combination(self) -> Ties:
        if self.apply_median and self.apply_stock:
            raise ValueError("apply_median and apply_stock cannot both be true")
        return self


class Della(Ties):
    """DELLA: TIES with magnitude-ranked dropout and no top-k (Deep et al., 2024)."""

    method: Literal["della"]
    k: Kept = Field(1.0, description="the fraction of each task vector kept, by magnitude")
    probability: Probability = Field(0.9, description="the mean probability of dropping a delta element")
    della_eps: Spread = Field(0.1, description="drop probabilities spread by magnitude rank")


class Dare(_TaskVectors):
    """DARE: drop each delta element with probability p, rescale, add (Yu et al., 2024)."""

    method: Literal["dare"]
    probability: Probability = Field(0.9, description="the probability of dropping each delta element")
    rescale: bool = Field(True, description="divide by 1 - probability")
    seed: int = Field(0, ge=0, lt=1 << 63, description="seeds the counter-based dropout")


class GeometricMedian(MethodNode):
    """The geometric median of the models (or of their task vectors over a base), per tensor, by
    Weiszfeld's algorithm."""

    INPUTS = ("models", "base")
    method: Literal["geometric_median"]
    models: list[Source] = Field(min_length=1)
    base: Source | None = None
    alpha: Weight = Field(1.0, description="with a base: scales the median task vector")
    eps: Positive = Field(1e-6, description="Weiszfeld's smallest distance")
    maxiter: int = Field(100, ge=0, le=100_000, description="Weiszfeld's iterations at most")
    ftol: NonNegative = Field(1e-20, description="Weiszfeld's relative tolerance")


class ModelStock(MethodNode):
    """Model stock: the mean task vector scaled by t = N cos / (1 + (N - 1) cos) (Jang et al., 2024)."""

    INPUTS = ("base", "models")
    method: Literal["model_stock"]
    base: Source
    models: list[Source] = Field(min_length=1)
    cos_eps: Positive = Field(1e-6, description="the cosine's guard against zero norms")


class Slerp(MethodNode):
    """Spherical interpolation of two models per tensor."""

    INPUTS = ("a", "b")
    method: Literal["slerp"]
    a: Source
    b: Source
    alpha: Probability = Field(0.5, description="0 gives a, 1 gives b")


def _whole(name: str, node: type[MethodNode], inputs: dict[str, Any], params: dict[str, Any], key: str) -> Any:
    from .programs import apply_whole

    defaults = {n: f.default for n, f in node.model_fields.items() if n != "method" and n not in node.INPUTS}
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"{name}() got unexpected parameters {sorted(unknown)}")
    return apply_whole(name, key, inputs, {**defaults, **params})


@merge_method(Ties, linear=False)
def ties(base: Any, models: list[Any], *, key: str = "", **params: Any) -> Any:
    """TIES over task vectors, with optional dropout, median or model stock."""
    return _whole("ties", Ties, {"base": base, "models": models}, params, key)


@merge_method(Della, linear=False)
def della(base: Any, models: list[Any], *, key: str = "", **params: Any) -> Any:
    """DELLA: magnitude-ranked dropout, sign election, disjoint mean."""
    return _whole("della", Della, {"base": base, "models": models}, params, key)


@merge_method(Dare, linear=False)
def dare(base: Any, models: list[Any], *, key: str = "", **params: Any) -> Any:
    """DARE: dropout, rescale, task arithmetic."""
    return _whole("dare", Dare, {"base": base, "models": models}, params, key)


@merge_method(GeometricMedian, linear=False)
def geometric_median(models: list[Any], *, base: Any = None, key: str = "", **params: Any) -> Any:
    """The per-tensor geometric median (Weiszfeld)."""
    return _whole("geometric_median", GeometricMedian, {"models": models, "base": base}, params, key)


@merge_method(ModelStock, linear=False)
def model_stock(base: Any, models: list[Any], *, key: str = "", **params: Any) -> Any:
    """Model stock over task vectors."""
    return _whole("model_stock", ModelStock, {"base": base, "models": models}, params, key)


@merge_method(Slerp, linear=False)
def slerp(a: Any, b: Any, *, key: str = "", **params: Any) -> Any:
    """Spherical interpolation per tensor."""
    return _whole("slerp", Slerp, {"a": a, "b": b}, params, key)
