"""Merge methods: one registry entry each (methods.registry), linear ones flattening to exact
weighted sums (methods.linear). Importing this package does not import torch."""

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
from .registry import METHODS, Method, MethodNode, merge_method

__all__ = [
    "METHODS", "Method", "MethodNode", "merge_method", "LinearForm", "Applied", "exact", "flatten",
    "Uniform", "Weighted", "WeightedInput", "AddDifference", "TaskArithmetic",
    "uniform", "weighted", "add_difference", "task_arithmetic",
]
