"""Method math on tiny hand-computed tensors, and exact flattening of recipe trees."""

from fractions import Fraction

import pytest
import torch

from merge_engine.errors import RecipeError
from merge_engine.methods import METHODS, add_difference, flatten, uniform, weighted
from merge_engine.recipe import parse_recipe


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_methods_are_registered_plain_functions():
    assert METHODS["uniform"].fn is uniform and METHODS["uniform"].linear
    assert METHODS["weighted"].fn is weighted
    assert METHODS["add_difference"].fn is add_difference


def test_uniform_weighted_add_difference_by_hand():
    assert torch.equal(uniform([t(1, 2), t(3, 4), t(5, 9)]), t(3, 5))
    assert torch.equal(weighted([t(1, 0), t(4, 8)], [3, 1]), t(1.75, 2))
    assert torch.equal(weighted([t(1, 0), t(4, 8)], [3, 1], normalize=False), t(7, 8))
    assert torch.equal(add_difference(t(1, 1), t(5, 3), t(1, 2), 0.5), t(3, 1.5))


def source(data):
    return parse_recipe({"merge": data}).merge


def test_binary_tree_of_halves_flattens_like_flat_uniform():
    tree = {"method": "uniform", "models": [
        {"method": "uniform", "models": ["a", "b"]}, {"method": "uniform", "models": ["c", "d"]}]}
    assert flatten(source(tree)) == flatten(source({"method": "uniform", "models": ["a", "b", "c", "d"]}))
    assert set(flatten(source(tree)).values()) == {Fraction(1, 4)}


def test_extending_a_merge_with_weight_equal_to_its_model_count():
    extended = {"method": "weighted", "models": [
        {"model": {"method": "uniform", "models": ["a", "b", "c"]}, "weight": 3}, "d"]}
    assert flatten(source(extended)) == {k: Fraction(1, 4) for k in "abcd"}


def test_decimal_weights_stay_decimal_and_repeats_add_up():
    flat = flatten(source({"method": "weighted", "models": [
        {"model": "a", "weight": 0.1}, {"model": "b", "weight": 0.2}, {"model": "a", "weight": 0.7}]}))
    assert flat == {"a": Fraction(8, 10), "b": Fraction(2, 10)}


def test_add_difference_coefficients():
    flat = flatten(source({"method": "add_difference", "a": "a", "b": "b", "c": "c", "alpha": 0.5}))
    assert flat == {"a": 1, "b": Fraction(1, 2), "c": Fraction(-1, 2)}


def test_cancelling_weights_are_an_error():
    cancelling = source({"method": "weighted", "normalize": False, "models": [
        {"model": "a", "weight": 1}, {"model": "a", "weight": -1}]})
    with pytest.raises(RecipeError, match="cancel out"):
        flatten(cancelling)
