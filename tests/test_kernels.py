"""The native weighted sum gives the torch path's bytes exactly, on every code path it has."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from merge_engine import kernels
from merge_engine.accumulate import add_term

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
KIND = kernels.torch_kinds()
FLAVOURS = ["vector", "portable"]  # vector falls back to portable code on CPUs without AVX2


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def native_module():
    if kernels._kernels is None:
        pytest.fail("merge_engine._kernels is not built (make reinstalls the package with a C compiler)")
    return kernels._kernels


def torch_path(sources: list[torch.Tensor], coefficients: list[float], out_dtype: torch.dtype) -> torch.Tensor:
    """What accumulate.py's torch path computes: fp32 sum term by term, rounded once."""
    n = sources[0].numel()
    acc, scratch = torch.empty(n), torch.empty(n)
    for j, (src, c) in enumerate(zip(sources, coefficients, strict=True)):
        add_term(acc, src, c, j == 0, scratch)
    return acc.to(out_dtype)


def native_sum(sources, coefficients, out_dtype, flavour, limit=float("inf")) -> tuple[torch.Tensor, bool]:
    out = torch.empty(sources[0].numel(), dtype=out_dtype)
    terms = [(s.data_ptr(), KIND[s.dtype], c) for s, c in zip(sources, coefficients, strict=True)]
    ok = native_module().weighted_sum(out.data_ptr(), KIND[out_dtype], out.numel(), terms, limit,
                                      portable=flavour == "portable")
    return out, ok


def test_native_kernel_is_built_and_used():
    assert native_module().ISA in ("avx2", "portable")
    if os.environ.get("SDMERGE_NATIVE") != "0":
        assert kernels.native() is not None
        assert kernels.describe().startswith("native")


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_same_bytes_as_the_torch_path(flavour, out_dtype):
    generator = torch.Generator().manual_seed(1)
    coefficients = [0.1, 1 / 3, 0.57]  # not powers of two: a fused multiply-add rounds differently
    for n in (1, 7, 8, 1023, 1025, 5003):  # vector tails, whole 1,024-element blocks and a partial one
        for dtypes in itertools.product(DTYPES, repeat=3):
            sources = [(torch.randn(n, generator=generator) * 4).to(d) for d in dtypes]
            sources[0][0] = 3e-6  # an fp16 subnormal once rounded
            expected = torch_path(sources, coefficients, out_dtype)
            actual, ok = native_sum(sources, coefficients, out_dtype, flavour, torch.finfo(out_dtype).max)
            assert ok
            assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8)), (n, dtypes)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rounding_matches_torch_for_every_kind_of_value(flavour, out_dtype):
    """Random fp32 bit patterns (normals, subnormals, Inf, NaN) and the rounding edges."""
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=torch.Generator().manual_seed(2),
                         dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([65504.0, 65519.996, 65520.0, 65536.0, 6.1035156e-05, 6.1e-05, 5.9604645e-08,
                          2.9802322e-08, 2.9802326e-08, 1e-45, float("inf"), -float("inf"), 0.0, -0.0,
                          3.3895314e38, 3.4028235e38])
    values = torch.cat([bits.view(torch.float32), edges, -edges])
    expected = values.to(out_dtype)
    actual, _ = native_sum([values], [1.0], out_dtype, flavour)
    nan = torch.isnan(expected)
    assert torch.equal(actual[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert bool(torch.isnan(actual[nan]).all())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_out_of_range_and_nan_are_reported(flavour):
    limit = torch.finfo(torch.float16).max
    for n in (5, 1000):  # caught in a vector tail and in whole vectors
        for bad in (float("nan"), float("inf"), -float("inf"), 70000.0, -65520.0):
            source = torch.zeros(n)
            source[n - 1] = bad
            _, ok = native_sum([source, source], [0.5, 0.5], torch.float16, flavour, limit)
            assert not ok, (n, bad)
        source = torch.full((n,), 65504.0)
        _, ok = native_sum([source], [1.0], torch.float16, flavour, limit)
        assert ok


def test_bad_arguments_are_refused():
    module = native_module()
    out = torch.empty(4)
    with pytest.raises(ValueError, match="at least one term"):
        module.weighted_sum(out.data_ptr(), 2, 4, [], 1.0)
    with pytest.raises(ValueError, match="unknown source kind"):
        module.weighted_sum(out.data_ptr(), 2, 4, [(out.data_ptr(), 9, 1.0)], 1.0)
    with pytest.raises(ValueError, match="unknown output kind"):
        module.weighted_sum(out.data_ptr(), 7, 4, [(out.data_ptr(), 2, 1.0)], 1.0)
    with pytest.raises(ValueError, match="negative"):
        module.weighted_sum(out.data_ptr(), 2, -1, [(out.data_ptr(), 2, 1.0)], 1.0)
    with pytest.raises(TypeError, match="a term is"):
        module.weighted_sum(out.data_ptr(), 2, 4, [(out.data_ptr(), 2)], 1.0)
