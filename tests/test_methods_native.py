"""The native passes of the non-linear methods (task_vectors and gram in _methods.c) against the torch
path they replace (SDMERGE_NATIVE=0), on fp16, bf16 and fp32 sources read as they are: TIES, DARE and
DELLA give the same bits, whole or in chunks (so the dropout draws and DELLA's mask bits are indexed
by the element, not the chunk); the Gram matrix of the median, model stock and slerp agrees to fp64
rounding. And against the fp64 reference, so both paths are right, not only the same."""

from __future__ import annotations

import pytest
import torch
from reference_methods import ref_dare, ref_ties

from merge_engine import kernels
from merge_engine.methods import dare, della, geometric_median, model_stock, slerp, ties
from merge_engine.methods.programs import GeometricMedian, Inputs, ModelStock, finite_source, source

pytestmark = pytest.mark.skipif(kernels.native() is None, reason="the native kernels are not built")
torch.set_num_threads(1)

KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def models(n: int, dtype: torch.dtype, numel: int = 5000, seed: int = 0):
    """A base and n models close to it, rounded to `dtype`: deltas of a few ulps, many of them equal
    in magnitude, as between fine-tunes of one model."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    return base.to(dtype), [(base + 0.02 * torch.randn(numel, generator=g)).to(dtype) for _ in range(n)]


def both(fn, monkeypatch, *args, **params):
    native = fn(*args, **params)
    with monkeypatch.context() as m:
        m.setenv("SDMERGE_NATIVE", "0")
        portable = fn(*args, **params)
    return native, portable


TASK_VECTORS = [
    (ties, {"k": 0.2, "vote_sgn": True}),
    (ties, {"k": 0.5}),
    (ties, {"k": 1.0}),
    (ties, {"k": 0.3, "probability": 0.4, "rescale": True, "seed": 7}),
    (ties, {"k": 0.3, "probability": 0.4, "rescale": False, "alpha": 0.7, "seed": 7}),
    (dare, {"probability": 0.9, "rescale": True, "seed": 1, "alpha": 1 / 3}),
    (dare, {"probability": 0.0}),
    (dare, {"probability": 1.0, "seed": 2}),
    (della, {"probability": 0.5, "della_eps": 0.2, "seed": 3}),
    (della, {"probability": 0.3, "della_eps": -0.25, "seed": 4, "k": 0.4, "vote_sgn": True}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("fn", "params"), TASK_VECTORS, ids=lambda v: getattr(v, "__name__", None) or str(v))
@pytest.mark.parametrize("n_models", [1, 2, 8])
def test_task_vectors_native_equals_torch_bit_for_bit(fn, params, n_models, dtype, monkeypatch):
    base, ms = models(n_models, dtype)
    native, portable = both(fn, monkeypatch, base, ms, key=KEY, **params)
    assert native.dtype == torch.float32
    assert torch.equal(native.view(torch.int32), portable.view(torch.int32))


@pytest.mark.parametrize(("fn", "params"), TASK_VECTORS[3:4] + TASK_VECTORS[5:6] + TASK_VECTORS[8:9])
def test_chunked_native_passes_draw_the_same_masks(fn, params):
    from merge_engine.methods.programs import apply_whole

    base, ms = models(5, torch.float16, numel=10_007)
    whole = fn(base, ms, key=KEY, **params)
    chunked = apply_whole(fn.__name__, KEY, {"base": base, "models": ms}, _params(fn, params), chunk=999)
    assert torch.equal(whole.view(torch.int32), chunked.view(torch.int32))


def _params(fn, params):
    from merge_engine.methods.registry import METHODS

    node = METHODS[fn.__name__].node
    return {**{n: f.default for n, f in node.model_fields.items() if n != "method" and n not in node.INPUTS},
            **params}


def test_native_ties_and_dare_match_the_fp64_reference():
    base, ms = models(4, torch.float16)
    wide = [m.double() for m in ms]
    got = ties(base, ms, key=KEY, k=0.2, vote_sgn=True)
    torch.testing.assert_close(got.double(), ref_ties(base.double(), wide, k=0.2, vote_sgn=True), rtol=1e-6, atol=1e-6)
    got = dare(base, ms, key=KEY, probability=0.6, rescale=True, seed=9)
    want = ref_dare(base.double(), wide, probability=0.6, rescale=True, seed=9, key=KEY)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_a_non_finite_source_takes_the_torch_path(monkeypatch):
    base, ms = models(3, torch.float16)
    ms[1][17] = float("nan")
    ms[2][99] = float("inf")
    assert finite_source(ms[1]) is None and finite_source(ms[0]) is not None
    native, portable = both(ties, monkeypatch, base, ms, key=KEY, k=0.5)
    assert torch.equal(native.isnan(), portable.isnan())
    assert torch.equal(native.nan_to_num(), portable.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("program", [GeometricMedian, ModelStock])
def test_native_gram_matches_the_fp64_matrix_product(program, dtype):
    base, ms = models(6, dtype, numel=4099)
    counts = {"models": len(ms), "base": 1}
    p = program({"eps": 1e-6, "maxiter": 100, "ftol": 1e-20, "cos_eps": 1e-6, "alpha": 1.0}, KEY, 4099,
                counts, torch.float32, torch.device("cpu"))
    wide = [m.float() for m in ms]
    x = Inputs(lambda n, i: base.float() if n == "base" else wide[i],
               lambda n, i: base if n == "base" else ms[i])
    points, _ = p.raw_points(x)
    assert points == [source(m) for m in ms]
    p.gather(0, 0, 4099, x)
    want = (p.points(x).double() @ p.points(x).double().T)
    torch.testing.assert_close(p.g, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_median_stock_and_slerp_native_agree_with_torch(dtype, monkeypatch):
    base, ms = models(5, dtype)
    for fn, args, params in [(geometric_median, (ms,), {}), (model_stock, (base, ms), {}),
                             (slerp, (ms[0], ms[1]), {"alpha": 0.3})]:
        native, portable = both(fn, monkeypatch, *args, key=KEY, **params)
        torch.testing.assert_close(native, portable, rtol=1e-6, atol=1e-7)
