"""Merge methods: one registry entry each (methods.registry), linear ones flattening to exact
weighted sums (methods.linear), non-linear ones streamed per tensor (methods.nonlinear, whose
programs live in methods.programs). Importing this package does not import torch."""

from .bake import Lora, LoraInput, LoraLeaf, lora
from .linear import (
    AddDifference,
    Applied,
    LinearForm,
    TaskArithmetic,
    Uniform,
    Weighted,
    WeightedInput,
    add_difference,
    exact,
    flatten,
    task_arithmetic,
    uniform,
    weighted,
)
from .nonlinear import (
    Dare,
    Della,
    GeometricMedian,
    ModelStock,
    Slerp,
    Ties,
    dare,
    della,
    geometric_median,
    model_stock,
    slerp,
    ties,
)
from .registry import METHODS, Method, MethodNode, merge_method

__all__ = [
    "METHODS", "Method", "MethodNode", "merge_method", "LinearForm", "Applied", "exact", "flatten",
    "Uniform", "Weighted", "WeightedInput", "AddDifference", "TaskArithmetic",
    "Ties", "Della", "Dare", "GeometricMedian", "ModelStock", "Slerp",
    "uniform", "weighted", "add_difference", "task_arithmetic", "Lora", "LoraInput", "LoraLeaf", "lora",
    "ties", "della", "dare", "geometric_median", "model_stock", "slerp",
]
