"""Seeded dropout that every pass, chunk size, thread count and device draws identically.

Element `e` of the tensor `key`, for the node's model `i`, draws `u = v / 2**24` with
`v = lowbias32(lowbias32(lo(e) ^ k0) ^ k1 ^ hi(e)) >> 8` and `(k0, k1)` from
`sha256(f"{seed}\\0{key}\\0{i}")` (docs/METHODS.md): a counter-based generator, so a multi-pass
method regenerates the very mask it used before, and a chunk's draws depend on nothing but its
element indices. The native kernel computes it where built; the torch path gives the same bits.
"""

from __future__ import annotations

import hashlib
import math

import torch

from . import kernels

_M32 = 0xFFFFFFFF
SCALE = 1 << 24


def stream_key(seed: int, key: str, model: int) -> tuple[int, int]:
    digest = hashlib.sha256(f"{seed}\0{key}\0{model}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def draws(seed: int, key: str, model: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The 24-bit draws `v` of elements [start, stop) as int32 (in `out` if given)."""
    k0, k1 = stream_key(seed, key, model)
    n = stop - start
    out = torch.empty(n, dtype=torch.int32) if out is None else out[:n]
    native = kernels.native()
    if native is not None:
        native.uniform24(out.data_ptr(), n, start, k0, k1)
        return out
    e = torch.arange(start, stop, dtype=torch.int64)
    x = _mix(_mix((e & _M32) ^ k0) ^ k1 ^ (e >> 32))
    return out.copy_(x >> 8)


def uniforms(seed: int, key: str, model: int, start: int, stop: int) -> torch.Tensor:
    """u in [0, 1) of elements [start, stop), as float64 (exact: multiples of 2**-24)."""
    return draws(seed, key, model, start, stop).to(torch.float64) / SCALE


def keep_limit(q: float) -> int:
    """`u < q` as an integer comparison of the draw: `v < keep_limit(q)` (q * 2**24 is exact in fp64)."""
    return math.ceil(min(max(q, 0.0), 1.0) * SCALE)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on uint32 values held in int64; products split so that nothing overflows."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _M32
