"""An independent, whole-tensor fp64 reference of docs/METHODS.md (a helper, not a test module).

Written from the specification alone, plainly and slowly: numpy uint32 / Python ints for the
counter-based dropout hash, numpy float64 for the math, a stable argsort for DELLA's ordinal
ranks, and direct Weiszfeld on the flattened tensors (no Gram matrix). Every function takes and
returns torch float64 tensors; the result has the inputs' shape.
"""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import torch

_LO = 0xFFFFFFFF


# --- seeded dropout: u(seed, key, i, e) -------------------------------------------------------

def ref_stream_key(seed: int, key: str, i: int) -> tuple[int, int]:
    digest = hashlib.sha256(f"{seed}\0{key}\0{i}".encode()).digest()
    return int.from_bytes(digest[0:4], "little"), int.from_bytes(digest[4:8], "little")


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """Wellons' lowbias32 on a uint32 array (numpy array arithmetic wraps mod 2**32)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def ref_uniforms(seed: int, key: str, i: int, n: int, *, start: int = 0) -> np.ndarray:
    """u of elements [start, start + n) as float64."""
    k0, k1 = ref_stream_key(seed, key, i)
    e = np.arange(start, start + n, dtype=np.uint64)
    lo = (e & np.uint64(_LO)).astype(np.uint32)
    hi = (e >> np.uint64(32)).astype(np.uint32)
    h = _lowbias32(_lowbias32(lo ^ np.uint32(k0)) ^ np.uint32(k1) ^ hi)
    return (h >> np.uint32(8)).astype(np.float64) / float(1 << 24)


def _mix_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _LO
    x ^= x >> 15
    x = (x * 0x846CA68B) & _LO
    return x ^ (x >> 16)


def ref_uniform_scalar(seed: int, key: str, i: int, e: int) -> float:
    """The same draw with Python ints only: a check of `ref_uniforms` itself."""
    k0, k1 = ref_stream_key(seed, key, i)
    h = _mix_int(_mix_int((e & _LO) ^ k0) ^ k1 ^ (e >> 32))
    return (h >> 8) / float(1 << 24)


# --- helpers ----------------------------------------------------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).reshape(-1).numpy().copy()


def _out(flat: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float64)).reshape(like.shape)


def _abs32(d: np.ndarray) -> np.ndarray:
    return np.abs(d.astype(np.float32))


def ordinal_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ascending ranks, ties broken by element index (scipy's rankdata 'ordinal')."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.int64)
    ranks[order] = np.arange(1, values.size + 1)
    return ranks


def keep_probability(d: np.ndarray, probability: float, della_eps: float) -> np.ndarray:
    """q(e) = clamp(1 - p + delta(e), 0, 1), delta from the fp32 |d| ranks (0 without della_eps)."""
    n = d.size
    if della_eps != 0:
        r = ordinal_ranks(_abs32(d)).astype(np.float64)
        delta = (r / n - (n + 1) / (2 * n)) * della_eps
    else:
        delta = np.zeros(n)
    return np.clip(1.0 - probability + delta, 0.0, 1.0)


def keep_mask(d: np.ndarray, i: int, *, probability: float, della_eps: float, seed: int, key: str) -> np.ndarray:
    return ref_uniforms(seed, key, i, d.size) < keep_probability(d, probability, della_eps)


def top_k(d: np.ndarray, k: float) -> np.ndarray:
    """Zero the elements whose fp32 |d| is below the max(floor((1-k) n), 1)-th smallest (k < 1)."""
    if k >= 1 or d.size == 0:
        return d
    rank = max(int((1 - k) * d.size), 1)
    a = _abs32(d)
    threshold = np.sort(a)[rank - 1]
    return np.where(a < threshold, 0.0, d)


def weiszfeld(points: np.ndarray, *, eps: float, maxiter: int, ftol: float) -> np.ndarray:
    """Geometric median of the rows of `points` (N x n, float64), directly."""
    m = points.sum(axis=0) / points.shape[0]
    objective = float(np.mean(np.linalg.norm(points - m, axis=1)))
    for _ in range(max(0, maxiter)):
        distances = np.linalg.norm(points - m, axis=1)
        w = 1.0 / np.maximum(distances, eps)
        m = (w[:, None] * points).sum(axis=0) / w.sum()
        new = float(np.mean(np.linalg.norm(points - m, axis=1)))
        if abs(objective - new) <= ftol * new:
            break
        objective = new
    return m


def stock_ratio(deltas: np.ndarray, cos_eps: float) -> float:
    """t = N c / (1 + (N - 1) c), c the mean cosine over all pairs i < j (1 for one model)."""
    n_models = deltas.shape[0]
    if n_models == 1:
        return 1.0
    norms = [float(np.linalg.norm(d)) for d in deltas]
    cosines = [float(np.dot(deltas[i], deltas[j])) / max(norms[i] * norms[j], cos_eps)
               for i, j in itertools.combinations(range(n_models), 2)]
    c = sum(cosines) / len(cosines)
    return n_models * c / (1 + (n_models - 1) * c)


# --- methods ----------------------------------------------------------------------------------

def ref_task_arithmetic(base: torch.Tensor, models: list[torch.Tensor], *, alpha: float = 1.0) -> torch.Tensor:
    b = _np(base)
    return _out(b + alpha * sum(_np(x) - b for x in models), base)


def ref_ties(base, models, *, k=0.2, vote_sgn=False, alpha=1.0, probability=0.0, della_eps=0.0,
             rescale=True, seed=0, apply_median=False, apply_stock=False, cos_eps=1e-6, eps=1e-6,
             maxiter=100, ftol=1e-20, key=""):
    b = _np(base)
    deltas = [_np(x) - b for x in models]
    dropout = probability > 0 or della_eps != 0
    if probability >= 1:
        return _out(b.copy(), base)
    if dropout:
        deltas = [np.where(keep_mask(d, i, probability=probability, della_eps=della_eps, seed=seed, key=key), d, 0.0)
                  for i, d in enumerate(deltas)]
    d = np.stack([top_k(x, k) for x in deltas])
    signs = np.sign(d)
    elected = np.sign(d.sum(axis=0) if vote_sgn else signs.sum(axis=0))
    agree = signs == elected
    kept = np.where(agree, d, 0.0)
    count = agree.sum(axis=0)
    total = kept.sum(axis=0)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    if apply_median:
        merged = weiszfeld(kept, eps=eps, maxiter=maxiter, ftol=ftol)
    elif apply_stock:
        merged = stock_ratio(kept, cos_eps) * mean
    else:
        merged = mean
    if dropout and rescale:
        merged = merged / (1 - probability)
    return _out(b + alpha * merged, base)


def ref_della(base, models, *, k=1.0, probability=0.9, della_eps=0.1, **params):
    return ref_ties(base, models, k=k, probability=probability, della_eps=della_eps, **params)


def ref_dare(base, models, *, probability=0.9, rescale=True, seed=0, alpha=1.0, key=""):
    b = _np(base)
    if probability >= 1:
        return _out(b.copy(), base)
    total = np.zeros_like(b)
    for i, x in enumerate(models):
        d = _np(x) - b
        total = total + np.where(keep_mask(d, i, probability=probability, della_eps=0.0, seed=seed, key=key), d, 0.0)
    if rescale:
        total = total / (1 - probability)
    return _out(b + alpha * total, base)


def ref_geometric_median(models, *, base=None, eps=1e-6, maxiter=100, ftol=1e-20, alpha=1.0):
    points = np.stack([_np(x) for x in models])
    if base is None:
        return _out(weiszfeld(points, eps=eps, maxiter=maxiter, ftol=ftol), models[0])
    b = _np(base)
    return _out(b + alpha * weiszfeld(points - b, eps=eps, maxiter=maxiter, ftol=ftol), base)


def ref_model_stock(base, models, *, cos_eps=1e-6):
    b = _np(base)
    d = np.stack([_np(x) - b for x in models])
    return _out(b + stock_ratio(d, cos_eps) * d.sum(axis=0) / d.shape[0], base)


def ref_slerp(a, b, *, alpha=0.5):
    x, y = _np(a), _np(b)
    lerp = (1 - alpha) * x + alpha * y
    na, nb = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if na == 0 or nb == 0:
        return _out(lerp, a)
    xa, yb = x / na, y / nb
    omega = math.acos(min(max(float(np.dot(xa, yb)), -1.0), 1.0))
    if math.sin(omega) == 0:
        return _out(lerp, a)
    res = (math.sin((1 - alpha) * omega) * xa + math.sin(alpha * omega) * yb) / math.sin(omega)
    return _out(res * ((1 - alpha) * na + alpha * nb), a)
