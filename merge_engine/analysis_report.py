"""An analysis on disk: `analysis.json`, a heatmap per component and metric, a 2-D map per component.

Everything is rendered into a hidden folder next to the output folder and moved in by renames,
so a failure leaves nothing behind and a reader never sees a half-written file. matplotlib is
imported here only, lazily, and used without pyplot (no global state: safe in a worker thread).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .analysis import Analysis
from .analysis_math import classical_mds, cluster_order

DPI = 100
FORMATS = ("png", "svg")
LABEL_CHARS = 28
CMAPS = {"l2": "magma_r", "cosine": "viridis"}  # dark = close, for both


def heatmap_inches(n: int) -> tuple[float, float]:
    side = min(5.0 + 0.32 * n, 48.0)
    return side + 1.5, side  # room for the colour bar


def map_inches(n: int) -> tuple[float, float]:
    return 14.0, 6.5


def pixels(inches: tuple[float, float]) -> tuple[int, int]:
    return round(inches[0] * DPI), round(inches[1] * DPI)


def write_report(analysis: Analysis, outdir: str | os.PathLike[str], *,
                 formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write the JSON and the pictures into `outdir` (created if needed); returns the files written."""
    outdir = Path(outdir).absolute()
    staging = outdir.parent / f".{outdir.name}.{os.getpid()}.{threading.get_ident()}.partial"
    staging.mkdir(parents=True)
    try:
        names = [_write_json(analysis, staging / "analysis.json")]
        for component in analysis.components:
            for metric in analysis.metrics:
                names += _heatmap(analysis, component, metric, staging, formats)
            names += _map(analysis, component, staging, formats)
        if not outdir.exists():
            os.replace(staging, outdir)  # the whole folder appears at once
        else:
            for name in names:
                os.replace(staging / name, outdir / name)
            staging.rmdir()
            for stale in [*outdir.glob("heatmap-*"), *outdir.glob("map-*")]:  # from an earlier report
                if stale.name not in names and stale.suffix[1:] in FORMATS:
                    stale.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [outdir / name for name in names]


def _write_json(analysis: Analysis, path: Path) -> str:
    data = {**analysis.to_dict(), "seconds": round(analysis.seconds, 3)}
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path.name


def _labels(analysis: Analysis) -> list[str]:
    def short(text: str) -> str:
        return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"

    return [short(f"{m.name}") for m in analysis.models]


def _subtitle(analysis: Analysis) -> str:
    if analysis.base is not None:
        return f"task vectors (weights minus {analysis.base.name})"
    return "weights"


def _save(figure, folder: Path, stem: str, formats: Sequence[str]) -> list[str]:
    from matplotlib import rc_context

    names = []
    with rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, small
        for fmt in formats:
            figure.savefig(folder / f"{stem}.{fmt}", format=fmt, dpi=DPI)
            names.append(f"{stem}.{fmt}")
    return names


def _heatmap(analysis: Analysis, component: str, metric: str, folder: Path, formats: Sequence[str]) -> list[str]:
    from matplotlib.figure import Figure

    values = getattr(analysis.components[component].figures, metric)
    distance = values if metric == "l2" else 1.0 - values
    order = cluster_order(distance)
    shown = values[np.ix_(order, order)]
    labels = [_labels(analysis)[i] for i in order]
    n = len(order)
    figure = Figure(figsize=heatmap_inches(n), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(shown, cmap=CMAPS[metric], interpolation="nearest")
    axes.set_xticks(range(n), labels, rotation=90, fontsize=8 if n > 20 else 10)
    axes.set_yticks(range(n), labels, fontsize=8 if n > 20 else 10)
    axes.set_title(f"{component}: {'L2 distance' if metric == 'l2' else 'cosine similarity'}\n"
                   f"{_subtitle(analysis)}, hierarchical-clustering order", fontsize=11)
    bar = figure.colorbar(image, ax=axes, shrink=0.8)
    bar.set_label("L2 distance (lower = closer)" if metric == "l2" else "cosine similarity (higher = closer)")
    if n <= 16:  # few enough cells to print the numbers
        middle = (np.nanmax(shown) + np.nanmin(shown)) / 2
        dark_high = metric == "l2"
        for i in range(n):
            for j in range(n):
                v = shown[i, j]
                light = (v > middle) == dark_high
                axes.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                          color="white" if light else "black")
    return _save(figure, folder, f"heatmap-{component}-{metric}", formats)


def _map(analysis: Analysis, component: str, folder: Path, formats: Sequence[str]) -> list[str]:
    from matplotlib.figure import Figure

    figures = analysis.components[component].figures
    labels = _labels(analysis)
    figure = Figure(figsize=map_inches(len(labels)), layout="constrained")
    left, right = figure.subplots(1, 2)
    _scatter(left, figures.l2, list(range(len(labels))), labels, figures.outliers)
    left.set_title(f"{component}: all {len(labels)} models (classical MDS of L2 distances)", fontsize=11)
    kept = [i for i in range(len(labels)) if i not in figures.outliers]
    if figures.outliers:
        _scatter(right, figures.l2, kept, labels, [])
        removed = ", ".join(labels[i] for i in figures.outliers)
        right.set_title(f"without outliers: {removed}", fontsize=11)
    else:
        right.set_axis_off()
        right.text(0.5, 0.5, "no outliers: nothing removed", ha="center", va="center", transform=right.transAxes)
    figure.suptitle(f"{component}: {_subtitle(analysis)}; distance units are those of the weights", fontsize=10)
    return _save(figure, folder, f"map-{component}", formats)


def _scatter(axes, l2: np.ndarray, members: list[int], labels: list[str], flagged: list[int]) -> None:
    coords = classical_mds(l2[np.ix_(members, members)])
    colours = ["tab:red" if i in flagged else "tab:blue" for i in members]
    axes.scatter(coords[:, 0], coords[:, 1], c=colours, s=36)
    names: dict[int, list[str]] = {}  # models at distance 0 share one point and one label
    for i in members:
        same = next((j for j in names if l2[i, j] == 0), i)
        names.setdefault(same, []).append(labels[i] + (" (outlier)" if i in flagged else ""))
    for (x, y), i in zip(coords, members, strict=True):
        if i in names:
            axes.annotate(" = ".join(names[i]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("MDS axis 1")
    axes.set_ylabel("MDS axis 2")
    axes.set_aspect("equal", adjustable="datalim")
    axes.grid(True, alpha=0.3)
