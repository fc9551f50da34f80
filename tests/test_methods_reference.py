"""The engine's plain tensor functions against the independent fp64 reference (tests/reference_methods.py),
on small hand-made tensors: masks and draws exactly, float64 math to rtol 1e-9 (Weiszfeld, which the
engine runs on a Gram matrix, to 1e-7 of the result's scale)."""

from __future__ import annotations

import pytest
import torch
from reference_methods import (
    ref_dare,
    ref_della,
    ref_geometric_median,
    ref_model_stock,
    ref_slerp,
    ref_task_arithmetic,
    ref_ties,
    ref_uniform_scalar,
    ref_uniforms,
)

from merge_engine.dropout import uniforms
from merge_engine.errors import RecipeError
from merge_engine.methods import (
    dare,
    della,
    geometric_median,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)
from merge_engine.recipe import parse_recipe

torch.set_num_threads(1)

KEY = "model.diffusion_model.out.2.weight"
SHAPES = [(7, 5), (64,), (3, 4, 3, 3)]


def data(shape, n_models, seed=0):
    torch.manual_seed(seed)
    base = torch.randn(shape, dtype=torch.float64)
    return base, [base + torch.randn(shape, dtype=torch.float64) for _ in range(n_models)]


def close(got, want, rtol=1e-9, atol=1e-12):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def close_weiszfeld(got, want):
    """Gram-matrix Weiszfeld vs direct: they may stop an iteration apart (ftol 1e-20 is below
    rounding), so compare to the result's scale, not element by element."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-7 * want.abs().max().item() + 1e-10


def tied():
    """Deltas with several equal |d| at the top-k threshold, of both signs, and exact zeros."""
    d1 = torch.tensor([3.0, -3.0, 3.0, 1.0, -2.0, 2.0, 0.0, 0.5, -3.0, 1.0], dtype=torch.float64)
    d2 = torch.tensor([-3.0, -1.0, 2.0, 2.0, 2.0, -2.0, 0.0, -0.5, 3.0, 1.0], dtype=torch.float64)
    d3 = torch.tensor([1.0, 1.0, -1.0, -2.0, 2.0, 2.0, 0.0, 0.5, 0.0, -1.0], dtype=torch.float64)
    base = torch.linspace(-1, 1, 10, dtype=torch.float64)
    return base, [base + d for d in (d1, d2, d3)]


# --- seeded dropout ---------------------------------------------------------------------------

@pytest.mark.parametrize(("seed", "key", "model"), [(0, "", 0), (1, KEY, 3), (2**40 + 7, "ü.weight", 1)])
def test_uniforms_match_reference(seed, key, model):
    want = torch.from_numpy(ref_uniforms(seed, key, model, 1000))
    assert torch.equal(uniforms(seed, key, model, 0, 1000), want)
    assert want[17].item() == ref_uniform_scalar(seed, key, model, 17)


def test_uniforms_past_two_to_the_32():
    start = 2**32 - 3
    want = torch.from_numpy(ref_uniforms(5, KEY, 2, 8, start=start))
    assert torch.equal(uniforms(5, KEY, 2, start, start + 8), want)
    assert want[4].item() == ref_uniform_scalar(5, KEY, 2, start + 4)


def test_uniforms_chunk_independent():
    whole = uniforms(9, KEY, 1, 0, 777)
    for a, b in [(0, 1), (1, 300), (300, 301), (301, 777), (500, 640)]:
        assert torch.equal(uniforms(9, KEY, 1, a, b), whole[a:b])


# --- ties / dare / della ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_models", [1, 2, 5])
@pytest.mark.parametrize("k", [1.0, 0.5, 0.2, 0.05])
@pytest.mark.parametrize("vote_sgn", [False, True])
def test_ties_matches_reference(shape, n_models, k, vote_sgn):
    base, models = data(shape, n_models, seed=n_models)
    close(ties(base, models, k=k, vote_sgn=vote_sgn, alpha=0.7),
          ref_ties(base, models, k=k, vote_sgn=vote_sgn, alpha=0.7))


@pytest.mark.parametrize("k", [0.5, 0.3, 0.25, 0.1])
@pytest.mark.parametrize("vote_sgn", [False, True])
def test_ties_equal_magnitudes_at_threshold(k, vote_sgn):
    base, models = tied()
    got = ties(base, models, k=k, vote_sgn=vote_sgn)
    close(got, ref_ties(base, models, k=k, vote_sgn=vote_sgn))


def test_ties_keeps_every_element_tied_at_threshold():
    base = torch.zeros(10, dtype=torch.float64)
    d = torch.tensor([3.0, -3.0, 3.0, 1.0, -2.0, 2.0, 0.0, 0.5, -3.0, 1.0], dtype=torch.float64)
    # k = 0.3: the 7th smallest |d| is 3, and all four elements of |d| = 3 stay (sign ignored for N = 1)
    want = torch.where(d.abs() >= 3, d, torch.zeros_like(d))
    close(ties(base, [d], k=0.3), want)
    close(ref_ties(base, [d], k=0.3), want)


@pytest.mark.parametrize("fn", [ties, della, dare])
def test_all_zero_deltas_give_the_base(fn):
    base, _ = data((7, 5), 1)
    got = fn(base, [base.clone(), base.clone()], key=KEY)
    close(got, base)


@pytest.mark.parametrize("n_models", [1, 2, 5])
@pytest.mark.parametrize("probability", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("rescale", [True, False])
def test_ties_dropout_matches_reference(n_models, probability, rescale):
    base, models = data((64,), n_models, seed=3)
    params = dict(k=0.5, probability=probability, rescale=rescale, seed=11, key=KEY)
    close(ties(base, models, **params), ref_ties(base, models, **params))


@pytest.mark.parametrize("della_eps", [0.5, -0.5])
def test_probability_one_drops_everything_even_with_della_eps(della_eps):
    base, models = data((7, 5), 2, seed=21)  # METHODS.md step 5: "probability = 1 drops everything: M = 0"
    params = dict(k=1.0, probability=1.0, della_eps=della_eps, key=KEY)
    close(ref_ties(base, models, **params), base)
    close(ties(base, models, **params), base)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_models", [1, 2, 5])
@pytest.mark.parametrize("probability", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_matches_reference(shape, n_models, probability, rescale):
    base, models = data(shape, n_models, seed=4)
    params = dict(probability=probability, rescale=rescale, seed=7, alpha=0.5, key=KEY)
    close(dare(base, models, **params), ref_dare(base, models, **params))


def test_dare_mask_is_exact():
    base, models = data((3, 4, 3, 3), 1, seed=5)
    got = dare(base, models, probability=0.5, rescale=False, seed=2, key=KEY)
    want = ref_dare(base, models, probability=0.5, rescale=False, seed=2, key=KEY)
    assert torch.equal(got != base, want != base)
    assert 0 < (got != base).sum().item() < base.numel()


def test_dare_p1_and_p0():
    base, models = data((7, 5), 2, seed=6)
    close(dare(base, models, probability=1.0, key=KEY), base)
    close(dare(base, models, probability=0.0, key=KEY), ref_task_arithmetic(base, models))


@pytest.mark.parametrize("della_eps", [0.1, 0.3, -0.1, -0.4])
@pytest.mark.parametrize("n_models", [1, 2, 5])
def test_della_matches_reference(della_eps, n_models):
    base, models = data((7, 5), n_models, seed=8)
    params = dict(probability=0.6, della_eps=della_eps, seed=3, key=KEY)
    close(della(base, models, **params), ref_della(base, models, **params))


def test_della_defaults_and_ties_equivalence():
    base, models = tied()
    close(della(base, models, key=KEY), ref_della(base, models, key=KEY))
    close(della(base, models, key=KEY, seed=4),
          ties(base, models, k=1.0, probability=0.9, della_eps=0.1, key=KEY, seed=4))


def test_della_mask_is_exact():
    base = torch.zeros(64, dtype=torch.float64)
    torch.manual_seed(9)
    d = torch.randn(64, dtype=torch.float64)
    for eps_ in (0.5, -0.5):
        got = della(base, [d], probability=0.5, della_eps=eps_, rescale=False, key=KEY)
        want = ref_della(base, [d], probability=0.5, della_eps=eps_, rescale=False, key=KEY)
        assert torch.equal(got != 0, want != 0)


def test_della_eps_with_p0_and_tied_ranks():
    base, models = tied()
    params = dict(k=0.5, probability=0.0, della_eps=0.8, seed=1, key=KEY)
    close(ties(base, models, **params), ref_ties(base, models, **params))


@pytest.mark.parametrize("n_models", [1, 2, 5])
@pytest.mark.parametrize("probability", [0.0, 0.4])
def test_ties_apply_median(n_models, probability):
    base, models = data((3, 4, 3, 3), n_models, seed=10)
    params = dict(k=0.5, probability=probability, apply_median=True, seed=2, key=KEY)
    close_weiszfeld(ties(base, models, **params), ref_ties(base, models, **params))


@pytest.mark.parametrize("n_models", [1, 2, 5])
@pytest.mark.parametrize("probability", [0.0, 0.4])
def test_ties_apply_stock(n_models, probability):
    base, models = data((7, 5), n_models, seed=11)
    models = [m + 0.5 for m in models]  # correlated deltas: a stock ratio away from 0 and 1
    params = dict(k=0.5, probability=probability, apply_stock=True, seed=2, key=KEY)
    close(ties(base, models, **params), ref_ties(base, models, **params))


def test_float32_inputs_give_float32():
    base, models = tied()
    got = ties(base.float(), [m.float() for m in models], k=0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_ties(base, models, k=0.5), rtol=1e-6, atol=1e-6)


# --- geometric median, model stock, slerp, task arithmetic ------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
def test_geometric_median_of_models(shape, n_models):
    _, models = data(shape, n_models, seed=12)
    close_weiszfeld(geometric_median(models), ref_geometric_median(models))


@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_geometric_median_of_deltas(n_models, alpha):
    base, models = data((7, 5), n_models, seed=13)
    close_weiszfeld(geometric_median(models, base=base, alpha=alpha),
                    ref_geometric_median(models, base=base, alpha=alpha))


@pytest.mark.parametrize("maxiter", [0, 1, 3])
def test_geometric_median_fixed_iterations(maxiter):
    _, models = data((64,), 5, seed=14)
    want = ref_geometric_median(models, maxiter=maxiter, ftol=0.0)
    close(geometric_median(models, maxiter=maxiter, ftol=0.0), want, rtol=1e-7, atol=1e-10)
    if maxiter == 0:
        close(want, sum(models) / 5)


def test_geometric_median_large_eps_is_the_mean():
    _, models = data((3, 4, 3, 3), 3, seed=15)
    close(geometric_median(models, eps=1e6), sum(models) / 3)


@pytest.mark.parametrize("n_models", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_model_stock_matches_reference(n_models, shape):
    base, models = data(shape, n_models, seed=16)
    models = [m + 0.3 for m in models]
    close(model_stock(base, models), ref_model_stock(base, models))
    if n_models == 1:
        close(model_stock(base, models), models[0])


def test_model_stock_zero_deltas_and_cos_eps():
    base, models = data((7, 5), 3, seed=17)
    close(model_stock(base, [base.clone()] * 3), base)
    tiny = [base + 1e-4 * (m - base) for m in models]  # norms product below cos_eps
    close(model_stock(base, tiny, cos_eps=1e-2), ref_model_stock(base, tiny, cos_eps=1e-2))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_slerp_matches_reference(alpha, shape):
    _, (a, b) = data(shape, 2, seed=18)
    close(slerp(a, b, alpha=alpha), ref_slerp(a, b, alpha=alpha))
    if alpha in (0.0, 1.0):
        close(slerp(a, b, alpha=alpha), a if alpha == 0 else b)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_slerp_parallel_and_zero_inputs_lerp(alpha):
    _, (a,) = data((7, 5), 1, seed=19)
    lerp = (1 - alpha) * a + alpha * 2.5 * a
    close(slerp(a, 2.5 * a, alpha=alpha), lerp)
    close(ref_slerp(a, 2.5 * a, alpha=alpha), lerp)
    zero = torch.zeros_like(a)
    close(slerp(zero, a, alpha=alpha), alpha * a)


@pytest.mark.parametrize("n_models", [1, 2, 5])
def test_task_arithmetic_matches_reference(n_models):
    base, models = data((3, 4, 3, 3), n_models, seed=20)
    close(task_arithmetic(base, models, alpha=0.6), ref_task_arithmetic(base, models, alpha=0.6))


# --- parameter ranges in recipes --------------------------------------------------------------

TASK = {"base": "a.safetensors", "models": ["b.safetensors", "c.safetensors"]}
INPUTS = {"ties": TASK, "dare": TASK, "della": TASK, "model_stock": TASK,
          "geometric_median": {"models": ["b.safetensors", "c.safetensors"]},
          "slerp": {"a": "a.safetensors", "b": "b.safetensors"}}


@pytest.mark.parametrize(("method", "field", "value"), [
    ("ties", "k", 1.5), ("ties", "k", 0.0), ("ties", "probability", -0.1), ("ties", "probability", 1.1),
    ("ties", "maxiter", -1), ("ties", "eps", 0.0), ("ties", "eps", -1e-6), ("ties", "cos_eps", -1e-6),
    ("dare", "probability", 1.1), ("della", "probability", -0.1),
    ("geometric_median", "maxiter", -1), ("geometric_median", "eps", 0.0),
    ("model_stock", "cos_eps", -1.0), ("slerp", "alpha", 2.0), ("slerp", "alpha", -0.5),
    ("ties", "kk", 0.5), ("slerp", "beta", 0.5), ("model_stock", "alpha", 1.0),
])
def test_out_of_range_parameters_are_recipe_errors(method, field, value):
    with pytest.raises(RecipeError) as info:
        parse_recipe({"merge": {"method": method, **INPUTS[method], field: value}})
    assert method in str(info.value) and field in str(info.value)


@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"k": 1.0, "probability": 1.0, "della_eps": -0.2, "maxiter": 0}),
    ("ties", {"k": 0.01, "probability": 0.0, "vote_sgn": True, "apply_median": True}),
    ("dare", {"probability": 0.0, "rescale": False}), ("della", {"della_eps": -0.1}),
    ("slerp", {"alpha": 0.0}), ("slerp", {"alpha": 1.0}), ("geometric_median", {"maxiter": 0, "ftol": 0.0}),
])
def test_boundary_parameters_are_accepted(method, params):
    parse_recipe({"merge": {"method": method, **INPUTS[method], **params}})
