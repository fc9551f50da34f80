"""How each non-linear method runs over one tensor in chunks: its streaming program.

A program makes `passes` gathering passes over the tensor's chunks (a top-k threshold's
histograms, the Gram matrix of its inputs, the magnitude ranks of DELLA), then gives the result
chunk by chunk. Its inputs come through `Inputs`, read (or computed) only when asked for, so memory
is a chunk of each input plus per-tensor statistics, never a whole model. The plain functions in
nonlinear.py run the same program over whole tensors as one chunk: there is one definition.

Whole-tensor quantities are exact: the k-th smallest |delta| comes from a two-level histogram of
its fp32 bits (16 bits, then the other 16 inside the chosen bin); the geometric median, model
stock and slerp need only inner products, so one pass gathers the Gram matrix in fp64 and the
result is a weighted sum with per-tensor coefficients (`coefficients()`), which the engine runs
through the same native kernel as a linear merge. Formulas: docs/METHODS.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .. import dropout, kernels

COARSE_BINS = 1 << 15  # the top 16 bits of a non-negative fp32 (the sign bit is 0)
FINE_BINS = 1 << 16
RANK_BLOCK = 1 << 20


Getter = Callable[[str, int | None], torch.Tensor | None]


class Inputs:
    """A chunk's inputs, each read or computed once, when first asked for; and, for the native
    kernels, `raw`: an input that is a plain source as its unconverted values (fp16, bf16 or
    fp32, contiguous, known finite), or None where it is computed, or not such a source."""

    def __init__(self, get: Getter, raw: Getter = lambda name, index: None):
        self.get, self.cache, self._raw = get, {}, raw

    def __call__(self, name: str, index: int | None = None) -> torch.Tensor:
        if (name, index) not in self.cache:
            self.cache[name, index] = self.get(name, index)
        return self.cache[name, index]

    def raw(self, name: str, index: int | None = None) -> torch.Tensor | None:
        return self._raw(name, index)

    def sources(self, name: str, count: int) -> list[tuple[int, int]] | None:
        """(address, kind) of the `count` inputs `name` for a native kernel, or None."""
        found = []
        for index in range(count):
            value = self.raw(name, index)
            if value is None:
                return None
            found.append(source(value))
        return found


def source(value: torch.Tensor) -> tuple[int, int]:
    return value.data_ptr(), kernels.torch_kinds()[value.dtype]


def finite_source(value: torch.Tensor) -> torch.Tensor | None:
    """`value` where a native kernel can read it as it is: fp16, bf16 or fp32, contiguous, on the
    CPU, and finite (a kernel is not asked to carry NaN and Inf the way torch does)."""
    native = kernels.native()
    if (native is None or value.dtype not in kernels.torch_kinds() or value.device.type != "cpu"
            or not value.is_contiguous()):
        return None
    return value if native.all_finite(value.data_ptr(), kernels.torch_kinds()[value.dtype], value.numel()) else None


class Program:
    passes = 0

    def __init__(self, params: dict[str, Any], key: str, numel: int, counts: dict[str, int | None],
                 dtype: torch.dtype, device: torch.device):
        self.p, self.key, self.numel, self.counts = params, key, numel, counts
        self.dtype, self.device = dtype, device

    def gather(self, index: int, start: int, stop: int, x: Inputs) -> None:
        raise NotImplementedError

    def end_pass(self, index: int) -> None:
        pass

    def chunk(self, start: int, stop: int, x: Inputs) -> torch.Tensor:
        """The result's elements [start, stop), in the computation dtype."""
        raise NotImplementedError

    def coefficients(self) -> dict[str, list[float] | float] | None:
        """Where the result is a weighted sum of the inputs (after the passes): the weights."""
        return None

    def models(self, x: Inputs, name: str = "models") -> list[torch.Tensor]:
        return [x(name, i) for i in range(self.counts[name] or 0)]


def in_order(rows: torch.Tensor) -> torch.Tensor:
    """The sum of rows (N x c) from 0, one row after another, as the native kernels add them
    (torch's own sum over rows groups them, which rounds differently)."""
    total = torch.zeros_like(rows[0])
    for row in rows:
        total += row
    return total


def gram(points: torch.Tensor) -> torch.Tensor:
    """points (N x c) -> their N x N inner products, in fp64."""
    wide = points.to(torch.float64)
    return wide @ wide.T


def weiszfeld(g: torch.Tensor, eps: float, maxiter: int, ftol: float) -> torch.Tensor:
    """Weiszfeld's iterations (as sd-mecha runs them) on points known by their Gram matrix `g`:
    the median as coefficients over the points (summing to 1). N x N numbers, in numpy: a hundred
    iterations over 32 models take a millisecond."""
    g64 = g.to(torch.float64).numpy()
    n = g64.shape[0]
    diag = np.diagonal(g64)

    def distances(c: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(diag - 2 * (g64 @ c) + c @ g64 @ c, 0.0))

    c = np.full(n, 1.0 / n)
    new_weights = np.ones(n)
    objective = float(distances(c).mean())
    for _ in range(max(0, maxiter)):
        previous = objective
        new_weights = 1.0 / np.maximum(distances(c), eps)
        c = new_weights / new_weights.sum()
        objective = float(distances(c).mean())
        if abs(previous - objective) <= ftol * objective:
            break
    return torch.from_numpy(new_weights / new_weights.sum())


class TaskVectors(Program):
    """ties, della and dare: dropout, top-k, sign election, then a mean, median, stock or sum."""

    def __init__(self, method: str, *args: Any):
        super().__init__(*args)
        p, n = self.p, self.counts["models"]
        self.n = n
        self.probability = p.get("probability", 0.0)
        # probability 1 drops everything, whatever della_eps says (as sd-mecha)
        self.della_eps = p.get("della_eps", 0.0) if self.probability < 1 else 0.0
        self.drop = self.probability > 0 or self.della_eps != 0
        self.k = p.get("k", 1.0)
        self.vote = method != "dare"
        self.combine = ("sum" if method == "dare" else "median" if p.get("apply_median")
                        else "stock" if p.get("apply_stock") else "mean")
        self.stages: list[tuple[str, int | None]] = []
        if self.drop and self.della_eps != 0:
            self.stages += [("rank", i) for i in range(n)]
        self.thresholds: torch.Tensor | None = None
        if self.k < 1:
            self.stages += [("coarse", None), ("fine", None)]
            self.coarse = torch.zeros(n, COARSE_BINS, dtype=torch.int64)
            self.fine = torch.zeros(n, FINE_BINS, dtype=torch.int64)
        if self.combine in ("median", "stock"):
            self.stages.append(("gram", None))
            self.g = torch.zeros(n, n, dtype=torch.float64)
        self.passes = len(self.stages) if self.numel else 0
        self.kept: list[np.ndarray] = [None] * n  # DELLA's keep masks, packed bits
        self.weights: torch.Tensor | None = None
        self.t = 1.0
        # the fused native passes (task_vectors in _methods.c), where the inputs are plain sources
        self.native = kernels.native() if self.dtype == torch.float32 and self.device.type == "cpu" else None
        self.limit = dropout.keep_limit(1.0 - self.probability)
        self.streams = ([dropout.stream_key(p["seed"], self.key, i) for i in range(n)]
                        if self.drop and self.della_eps == 0 else None)
        self.threshold_values = [-1.0] * n

    # -- the deltas, as far as the passes so far allow ------------------------------------------

    def delta(self, x: Inputs, i: int) -> torch.Tensor:
        return x("models", i) - x("base")

    def mask(self, i: int, start: int, stop: int) -> torch.Tensor:
        if self.della_eps != 0:
            bits = np.unpackbits(self.kept[i][start // 8: (stop + 7) // 8], count=None)
            first = start - start // 8 * 8
            return torch.from_numpy(bits[first: first + stop - start].astype(bool)).to(self.device)
        limit = dropout.keep_limit(1.0 - self.probability)
        return dropout.draws(self.p["seed"], self.key, i, start, stop).to(self.device) < limit

    def dropped(self, x: Inputs, i: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        d = torch.sub(x("models", i), x("base"), out=out)
        return d.mul_(self.mask(i, start, stop)) if self.drop else d

    def selected(self, x: Inputs, start: int, stop: int) -> torch.Tensor:
        """The task vectors of [start, stop) stacked (N x c): dropped out and top-k filtered."""
        d = torch.empty(self.n, stop - start, dtype=self.dtype, device=self.device)
        for i in range(self.n):
            self.dropped(x, i, start, stop, d[i])
        if self.thresholds is not None:
            magnitudes = d.abs() if d.dtype == torch.float32 else d.abs().float()
            d.masked_fill_(magnitudes < self.thresholds.to(self.device)[:, None], 0.0)
        return d

    def elected(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The deltas that agree with the elected sign (others 0), and how many agree."""
        signs = torch.sign(d)
        final = torch.sign(in_order(d) if self.p.get("vote_sgn") else signs.sum(0))
        agree = signs == final
        return d * agree, agree.sum(0)

    # -- passes -----------------------------------------------------------------------------------

    def gather(self, index: int, start: int, stop: int, x: Inputs) -> None:
        stage, i = self.stages[index]
        if stage == "rank":
            if start == 0:
                self.magnitudes = torch.empty(self.numel, dtype=torch.float32)
            self.magnitudes[start:stop] = self.delta(x, i).abs().float().cpu()
        elif stage in ("coarse", "fine"):
            if self._fused(0 if stage == "coarse" else 1, start, stop, x):
                return
            native = kernels.native() if self.device.type == "cpu" else None
            for i in range(self.n):
                magnitudes = self.dropped(x, i, start, stop).float().contiguous()
                if native is not None:
                    hist = self.coarse[i] if stage == "coarse" else self.fine[i]
                    native.magnitude_histogram(hist.data_ptr(), magnitudes.data_ptr(), magnitudes.numel(),
                                               -1 if stage == "coarse" else int(self.bin[i]))
                    continue
                bits = magnitudes.abs().view(torch.int32)
                if stage == "coarse":
                    self.coarse[i] += torch.bincount(bits >> 16, minlength=COARSE_BINS)[:COARSE_BINS].cpu()
                else:
                    inside = bits[(bits >> 16) == int(self.bin[i])] & 0xFFFF
                    self.fine[i] += torch.bincount(inside, minlength=FINE_BINS).cpu()
        else:
            filtered, _ = self.elected(self.selected(x, start, stop))
            points = filtered - filtered[:1] if self.combine == "median" else filtered
            self.g += gram(points).cpu()

    def end_pass(self, index: int) -> None:
        stage, i = self.stages[index]
        if stage == "rank":
            self.kept[i] = self._della_mask(i)
            del self.magnitudes
        elif stage == "coarse":
            kth = max(int((1 - self.k) * self.numel), 1)
            cum = self.coarse.cumsum(1)
            self.bin = torch.searchsorted(cum, torch.full((self.n, 1), kth)).squeeze(1)
            below = torch.where(self.bin > 0, cum.gather(1, (self.bin - 1).clamp(min=0)[:, None]).squeeze(1), 0)
            self.rank_in_bin = kth - below
        elif stage == "fine":
            cum = self.fine.cumsum(1)
            low = torch.searchsorted(cum, self.rank_in_bin[:, None]).squeeze(1)
            self.thresholds = ((self.bin << 16) | low).to(torch.int32).view(torch.float32)
            self.threshold_values = self.thresholds.tolist()
        elif self.combine == "median":
            p = self.p
            self.weights = weiszfeld(self.g, p["eps"], p["maxiter"], p["ftol"])
        else:
            self.t = stock_ratio(self.g, self.p["cos_eps"])

    def _della_mask(self, i: int) -> np.ndarray:
        """Keep each element with probability 1 - p + (rank/n - (n+1)/2n) * eps, its rank the
        ordinal rank of |delta| (ties by position); the mask kept as packed bits."""
        n = self.numel
        order = torch.sort(self.magnitudes, stable=True).indices
        rank = torch.empty(n, dtype=torch.int32)
        rank[order] = torch.arange(1, n + 1, dtype=torch.int32)
        del order
        kept = np.empty(n, dtype=bool)
        for start in range(0, n, RANK_BLOCK):
            stop = min(start + RANK_BLOCK, n)
            spread = (rank[start:stop].to(torch.float64) / n - (n + 1) / (n * 2)) * self.della_eps
            q = (1 - self.probability + spread).clamp(0, 1)
            draws = dropout.draws(self.p["seed"], self.key, i, start, stop).to(torch.float64)
            kept[start:stop] = (draws < q * dropout.SCALE).numpy()
        return np.packbits(kept)

    def chunk(self, start: int, stop: int, x: Inputs) -> torch.Tensor:
        if stop == start:
            return x("base")
        if self.combine in ("sum", "mean"):
            out = torch.empty(stop - start, dtype=torch.float32)
            if self._fused(2, start, stop, x, out):
                return out
        d = self.selected(x, start, stop)
        native = kernels.native() if d.dtype == torch.float32 and d.device.type == "cpu" else None
        if not self.vote:
            merged = in_order(d)
        elif self.combine == "mean" and native is not None:  # the same election and mean, in one pass
            merged, d = torch.empty(stop - start, dtype=torch.float32), d.contiguous()
            native.elect_merge(merged.data_ptr(), d.data_ptr(), self.n, stop - start, bool(self.p.get("vote_sgn")))
        else:
            filtered, agree = self.elected(d)
            if self.combine == "median":
                merged = (self.weights.to(self.device, filtered.dtype)[:, None] * filtered).sum(0)
            else:
                merged = torch.where(agree > 0, in_order(filtered) / agree.clamp(min=1), 0) * self.t
        if self.drop and self.p.get("rescale") and self.probability < 1:
            merged = merged / (1 - self.probability)
        return x("base") + merged * self.p["alpha"]


    def _fused(self, op: int, start: int, stop: int, x: Inputs, out: torch.Tensor | None = None) -> bool:
        """The pass `op` (0, 1: the histograms; 2: the merge into `out`) over the chunk in one
        native call, where every input is a plain source; False where it is not."""
        if self.native is None or (base := x.raw("base")) is None:
            return False
        models = x.sources("models", self.n)
        if models is None:
            return False
        hists = self.coarse if op == 0 else self.fine if op == 1 else None
        rows = []
        for i, (address, kind) in enumerate(models):
            mask, (k0, k1), bits = 0, (0, 0), 0
            if self.della_eps != 0:
                mask, bits = 2, self.kept[i].ctypes.data
            elif self.drop:
                mask, (k0, k1) = 1, self.streams[i]
            rows.append((address, kind, mask, k0, k1, self.limit, bits, self.threshold_values[i],
                         0 if hists is None else hists[i].data_ptr(), int(self.bin[i]) if op == 1 else -1))
        vote = 0 if not self.vote else 2 if self.p.get("vote_sgn") else 1
        rescale = bool(self.drop and self.p.get("rescale") and self.probability < 1)
        self.native.task_vectors(op, 0 if out is None else out.data_ptr(), stop - start, start, source(base), rows,
                                 vote, rescale, 1.0 - self.probability, self.p.get("alpha", 1.0))
        return True


def stock_ratio(g: torch.Tensor, cos_eps: float) -> float:
    """Model stock's t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the deltas."""
    n = g.shape[0]
    if n < 2:
        return 1.0
    norms = torch.diagonal(g).clamp(min=0).sqrt()
    cos = g / torch.clamp(norms[:, None] * norms[None, :], min=cos_eps)
    pairs = torch.triu_indices(n, n, offset=1)
    mean = float(cos[pairs[0], pairs[1]].mean())
    denominator = 1 + (n - 1) * mean
    return n * mean / denominator if denominator != 0 else 0.0  # opposite deltas: nothing shared (as sd-mecha's nan_to_num)


class _Gram(Program):
    """A method whose result is a weighted sum of its inputs with weights from their Gram matrix."""

    passes = 1
    inputs: tuple[str, ...] = ()

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.g: torch.Tensor | None = None
        self.passes = 1 if self.numel else 0
        self.weights: dict[str, list[float] | float] = self.trivial()

    def points(self, x: Inputs) -> torch.Tensor:
        raise NotImplementedError

    def trivial(self) -> dict[str, list[float] | float]:
        raise NotImplementedError

    def raw_points(self, x: Inputs) -> tuple[list[tuple[int, int]], tuple[int, int] | None] | None:
        """The points as plain sources for the native kernel, and the source they are taken less."""
        return None

    def gather(self, index: int, start: int, stop: int, x: Inputs) -> None:
        native = kernels.native() if self.dtype == torch.float32 and self.device.type == "cpu" else None
        raw = self.raw_points(x) if native is not None else None
        if raw is not None:
            points, reference = raw
            if self.g is None:
                self.g = torch.zeros(len(points), len(points), dtype=torch.float64)
            native.gram(self.g.data_ptr(), stop - start, points, reference)
            return
        g = gram(self.points(x)).cpu()
        self.g = g if self.g is None else self.g + g

    def coefficients(self) -> dict[str, list[float] | float]:
        return self.weights

    def chunk(self, start: int, stop: int, x: Inputs) -> torch.Tensor:
        total = None
        for name, weights in self.weights.items():
            values = [x(name)] if isinstance(weights, float) else self.models(x, name)
            for value, w in zip(values, [weights] if isinstance(weights, float) else weights, strict=True):
                term = value * w
                total = term if total is None else total + term
        return total


class GeometricMedian(_Gram):
    def points(self, x: Inputs) -> torch.Tensor:
        models = torch.stack(self.models(x))
        return models - models[:1]  # the median does not move with a translation; the deltas keep precision

    def raw_points(self, x: Inputs) -> tuple[list[tuple[int, int]], tuple[int, int] | None] | None:
        points = x.sources("models", self.counts["models"])
        return None if points is None else (points, points[0])

    def trivial(self) -> dict[str, list[float] | float]:
        n = self.counts["models"]
        return self._with_base([1.0 / n] * n)

    def _with_base(self, c: Sequence[float]) -> dict[str, list[float] | float]:
        if self.counts.get("base") is None:
            return {"models": list(c)}
        alpha = self.p["alpha"]
        return {"base": 1.0 - alpha * math.fsum(c), "models": [alpha * w for w in c]}

    def end_pass(self, index: int) -> None:
        p = self.p
        self.weights = self._with_base(weiszfeld(self.g, p["eps"], p["maxiter"], p["ftol"]).tolist())


class ModelStock(_Gram):
    def points(self, x: Inputs) -> torch.Tensor:
        return torch.stack(self.models(x)) - x("base")

    def raw_points(self, x: Inputs) -> tuple[list[tuple[int, int]], tuple[int, int] | None] | None:
        points, base = x.sources("models", self.counts["models"]), x.raw("base")
        return None if points is None or base is None else (points, source(base))

    def trivial(self) -> dict[str, list[float] | float]:
        return self._weights(1.0)

    def _weights(self, t: float) -> dict[str, list[float] | float]:
        n = self.counts["models"]
        return {"base": 1.0 - t, "models": [t / n] * n}

    def end_pass(self, index: int) -> None:
        self.weights = self._weights(stock_ratio(self.g, self.p["cos_eps"]))


class Slerp(_Gram):
    def points(self, x: Inputs) -> torch.Tensor:
        return torch.stack([x("a"), x("b")])

    def raw_points(self, x: Inputs) -> tuple[list[tuple[int, int]], tuple[int, int] | None] | None:
        a, b = x.raw("a"), x.raw("b")
        return None if a is None or b is None else ([source(a), source(b)], None)

    def trivial(self) -> dict[str, list[float] | float]:
        return {"a": 1.0 - self.p["alpha"], "b": self.p["alpha"]}

    def end_pass(self, index: int) -> None:
        alpha, g = self.p["alpha"], self.g.tolist()
        na, nb = math.sqrt(max(g[0][0], 0.0)), math.sqrt(max(g[1][1], 0.0))
        try:
            omega = math.acos(min(max(g[0][1] / (na * nb), -1.0), 1.0))
            scale = ((1 - alpha) * na + alpha * nb) / math.sin(omega)
            ca, cb = math.sin((1 - alpha) * omega) * scale / na, math.sin(alpha * omega) * scale / nb
        except (ZeroDivisionError, ValueError):
            return  # parallel or zero: the plain interpolation
        if math.isfinite(ca) and math.isfinite(cb):
            self.weights = {"a": ca, "b": cb}


PROGRAMS: dict[str, Callable[..., Program]] = {
    "ties": lambda *a: TaskVectors("ties", *a),
    "della": lambda *a: TaskVectors("della", *a),
    "dare": lambda *a: TaskVectors("dare", *a),
    "geometric_median": GeometricMedian,
    "model_stock": ModelStock,
    "slerp": Slerp,
}


def run(program: Program, numel: int, chunk: int, inputs: Callable[[int, int], Inputs]) -> torch.Tensor:
    """All of a program's passes over [0, numel) in chunks, then its result, concatenated."""
    for index in range(program.passes):
        for start in range(0, numel, chunk):
            program.gather(index, start, min(start + chunk, numel), inputs(start, min(start + chunk, numel)))
        program.end_pass(index)
    parts = [program.chunk(start, min(start + chunk, numel), inputs(start, min(start + chunk, numel)))
             for start in range(0, numel, chunk)] or [program.chunk(0, 0, inputs(0, 0))]
    return torch.cat(parts)


def apply_whole(name: str, key: str, inputs: dict[str, Any], params: dict[str, Any],
                chunk: int | None = None) -> torch.Tensor:
    """The method over whole tensors (optionally in chunks of `chunk` elements, as the engine
    runs it), computed in their dtype (fp32 for narrower floats)."""
    tensors = [t for v in inputs.values() for t in (v if isinstance(v, list) else [v]) if t is not None]
    first = tensors[0]
    dtype = first.dtype if first.dtype in (torch.float32, torch.float64) else torch.float32
    counts = {n: (len(v) if isinstance(v, list) else None if v is None else 1) for n, v in inputs.items()}
    flat = {n: ([t.reshape(-1).to(dtype) for t in v] if isinstance(v, list) else
                None if v is None else v.reshape(-1).to(dtype)) for n, v in inputs.items()}
    given = {n: ([t.reshape(-1) for t in v] if isinstance(v, list) else None if v is None else v.reshape(-1))
             for n, v in inputs.items()}
    numel = first.numel()
    program = PROGRAMS[name](params, key, numel, counts, dtype, first.device)

    def at(start: int, stop: int) -> Inputs:
        return Inputs(lambda n, i: (flat[n][i] if i is not None else flat[n])[start:stop],
                      lambda n, i: None if given[n] is None else
                      finite_source((given[n][i] if i is not None else given[n])[start:stop]))

    return run(program, numel, chunk or max(numel, 1), at).reshape(first.shape)
