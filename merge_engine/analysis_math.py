"""From accumulated Gram matrices to the figures users read: distances, cosines, norms, outliers,
and the orderings the pictures need (hierarchical clustering, classical MDS). numpy only.

A Gram matrix here is (N+1) x (N+1) over the rows y_i = x_i - p (i < N) and p itself (the pivot:
the base model, or the first model). Distances are translation invariant and come from the
y-block alone; raw inner products <x_i, x_j> are rebuilt from the pivot row when needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OUTLIER_Z = 3.0  # robust z-score (median / MAD) above which a model is an outlier ...
OUTLIER_RATIO = 2.0  # ... when it is also this many times the median distance to the mean


@dataclass
class Figures:
    """Everything one Gram matrix says about N models."""

    l2: np.ndarray
    cosine: np.ndarray
    norm: np.ndarray
    outlier_score: np.ndarray  # L2 distance to the uniform mean of all models
    outliers: list[int]


@dataclass
class ComponentFigures:
    figures: Figures
    identical_groups: list[list[int]]
    keys: int
    params: int
    blocks: dict[str, Figures] = field(default_factory=dict)  # UNet only

    def to_dict(self, metrics: tuple[str, ...]) -> dict:
        f = self.figures
        out = {m: _rounded(getattr(f, m)) for m in metrics}
        out.update(norm=_rounded(f.norm), outlier_score=_rounded(f.outlier_score), outliers=f.outliers,
                   identical_groups=self.identical_groups, keys=self.keys, params=self.params)
        if self.blocks:
            out["blocks"] = {name: {"norm": _rounded(b.norm), "outlier_score": _rounded(b.outlier_score),
                                    "mean_l2": _rounded(b.l2.sum(axis=1) / max(len(b.norm) - 1, 1)),
                                    "outliers": b.outliers}
                             for name, b in self.blocks.items()}
        return out


def _rounded(values: np.ndarray) -> list:
    return np.asarray(values, dtype=float).tolist()  # full double precision; JSON has no NaN here


def pivot_last(gram: np.ndarray, *, has_base: bool) -> np.ndarray:
    """The pass's Gram over [p, y...] (without a base, p = x_0 and y_0 = 0 has no row) as the
    (N+1) x (N+1) Gram over [y_0, ..., y_{N-1}, p] that the figures read."""
    if has_base:
        order = [*range(1, len(gram)), 0]
        return gram[np.ix_(order, order)]
    n = len(gram)
    out = np.zeros((n + 1, n + 1))
    out[1:n, 1:n] = gram[1:, 1:]
    out[1:n, n] = out[n, 1:n] = gram[1:, 0]
    out[n, n] = gram[0, 0]
    return out


def figures(gram: np.ndarray, *, relative: bool, identical: list[list[int]] = ()) -> Figures:
    n = gram.shape[0] - 1
    h = gram[:n, :n]
    inner = h if relative else h + gram[:n, n][:, None] + gram[:n, n][None, :] + gram[n, n]
    diag = np.diag(h)
    l2 = np.sqrt(np.maximum(diag[:, None] + diag[None, :] - 2 * h, 0.0))
    norm = np.sqrt(np.maximum(np.diag(inner), 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(np.outer(norm, norm) > 0, inner / np.outer(norm, norm), 0.0)
    cosine = np.clip(cosine, -1.0, 1.0)
    for group in identical:  # bytes proven equal: exact figures, whatever the rounding said
        for i in group:
            for j in group:
                l2[i, j] = 0.0
                cosine[i, j] = 1.0 if norm[i] > 0 else 0.0
    np.fill_diagonal(l2, 0.0)
    np.fill_diagonal(cosine, np.where(norm > 0, 1.0, 0.0))
    score2 = diag - 2 * h.sum(axis=1) / n + h.sum() / n**2
    score = np.sqrt(np.maximum(score2, 0.0))
    return Figures(l2, cosine, norm, score, outliers(score))


def outliers(score: np.ndarray) -> list[int]:
    """Models far from the mean compared with the others: robust z > 3 and > 2x the median."""
    if len(score) < 3:
        return []
    median = float(np.median(score))
    mad = 1.4826 * float(np.median(np.abs(score - median)))
    limit = max(median + OUTLIER_Z * mad, OUTLIER_RATIO * median)
    return [int(i) for i in np.flatnonzero(score > limit)] if limit > 0 else []


def component_figures(blocks: dict[str, np.ndarray], *, relative: bool, identical: list[list[int]],
                      keys: int, params: int) -> ComponentFigures:
    total = sum(blocks.values())
    per_block = {}
    if len(blocks) > 1:
        per_block = {name: figures(blocks[name], relative=relative) for name in sorted(blocks, key=_block_order)}
    return ComponentFigures(figures(total, relative=relative, identical=identical), identical, keys, params,
                            per_block)


def _block_order(name: str) -> tuple:
    head, _, index = name.partition(".")
    rank = {"time_embed": 0, "label_emb": 1, "input_blocks": 2, "middle_block": 3, "output_blocks": 4}
    return rank.get(head, 5), int(index) if index.isdigit() else 0, name


def cluster_order(distance: np.ndarray) -> list[int]:
    """Leaf order of average-linkage hierarchical clustering: similar models end up adjacent."""
    n = len(distance)
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    d = {(i, j): float(distance[i, j]) for i in range(n) for j in range(i + 1, n)}
    next_id = n
    while len(clusters) > 1:
        (a, b), _ = min(d.items(), key=lambda kv: (kv[1], kv[0]))
        merged = clusters.pop(a) + clusters.pop(b)
        d = {k: v for k, v in d.items() if a not in k and b not in k}
        for other, members in clusters.items():
            d[(other, next_id)] = float(np.mean(distance[np.ix_(members, merged)]))
        clusters[next_id] = merged
        next_id += 1
    return next(iter(clusters.values())) if clusters else []


def classical_mds(distance: np.ndarray, dims: int = 2) -> np.ndarray:
    """Coordinates whose Euclidean distances best match `distance` (Torgerson's classical MDS)."""
    n = len(distance)
    if n == 0:
        return np.zeros((0, dims))
    centre = np.eye(n) - 1.0 / n
    b = -0.5 * centre @ (distance**2) @ centre
    values, vectors = np.linalg.eigh((b + b.T) / 2)
    top = np.argsort(values)[::-1][:dims]
    coords = vectors[:, top] * np.sqrt(np.maximum(values[top], 0.0))
    if coords.shape[1] < dims:
        coords = np.hstack([coords, np.zeros((n, dims - coords.shape[1]))])
    return coords
