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


class Inputs:
    """A chunk's inputs, each read or computed once, when first asked for."""

    def __init__(self, get: Callable[[str, int | None], torch.Tensor]):
        self.get, self.cache = get, {}

    def __call__(self, name: str, index: int | None = None) -> torch.Tensor:
        if (name, index) not in self.cache:
            self.cache[name, index] = self.get(name, index)
        return self.cache[name, index]


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
        final = torch.sign(d.sum(0) if self.p.get("vote_sgn") else signs.sum(0))
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
        d = self.selected(x, start, stop)
        native = kernels.native() if d.dtype == torch.float32 and d.device.type == "cpu" else None
        if not self.vote:
            merged = d.sum(0)
        elif self.combine == "mean" and native is not None:  # the same election and mean, in one pass
            merged, d = torch.empty(stop - start, dtype=torch.float32), d.contiguous()
            native.elect_merge(merged.data_ptr(), d.data_ptr(), self.n, stop - start, bool(self.p.get("vote_sgn")))
        else:
            filtered, agree = self.elected(d)
            if self.combine == "median":
                merged = (self.weights.to(self.device, filtered.dtype)[:, None] * filtered).sum(0)
            else:
                merged = torch.where(agree > 0, filtered.sum(0) / agree.clamp(min=1), 0) * self.t
        if self.drop and self.p.get("rescale") and self.probability < 1:
            merged = merged / (1 - self.probability)
        return x("base") + merged * self.p["alpha"]


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

    def gather(self, index: int, start: int, stop: int, x: Inputs) -> None:
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
    numel = first.numel()
    program = PROGRAMS[name](params, key, numel, counts, dtype, first.device)

    def at(start: int, stop: int) -> Inputs:
        return Inputs(lambda n, i: (flat[n][i] if i is not None else flat[n])[start:stop])

    return run(program, numel, chunk or max(numel, 1), at).reshape(first.shape)
