"""A labelled image grid: one column per target, one row per (topic, prompt, seed), readable headers."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np

PAD = 8
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable font
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Wrap `text` to `width` pixels, at most `max_lines` lines (the last one ellipsised)."""
    average = max(1.0, draw.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
    lines = textwrap.wrap(text, width=max(4, int(width / average))) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)] + "…"
    return lines


def make_grid(images: Sequence[Sequence[np.ndarray]], column_labels: Sequence[str],
              row_labels: Sequence[str]) -> np.ndarray:
    """images[row][column] (HxWx3 uint8; one size within a row, rows may differ: topics of other
    sizes) -> one labelled HxWx3 uint8 array. Columns are as wide as the widest row's images;
    narrower images are centred."""
    from PIL import Image, ImageDraw

    rows, columns = len(images), len(images[0])
    heights = [row[0].shape[0] for row in images]
    width = max(row[0].shape[1] for row in images)
    size = max(12, min(28, width // 12))
    font = _font(size)
    line = int(size * 1.3)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    column_text = [_wrap(probe, label, font, width - 2 * PAD, 3) for label in column_labels]
    label_width = max(160, min(3 * width // 2, 360)) if rows > 1 or any(row_labels) else 0
    row_text = [_wrap(probe, label, font, label_width - 2 * PAD, max(1, (height - 2 * PAD) // line))
                for label, height in zip(row_labels, heights, strict=True)]
    header = PAD * 2 + line * max(len(t) for t in column_text)
    canvas = Image.new("RGB", (label_width + columns * width, header + sum(heights)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(column_text):
        for i, text in enumerate(lines):
            x = label_width + c * width + (width - draw.textlength(text, font=font)) / 2
            draw.text((x, PAD + i * line), text, fill=INK, font=font)
    top = header
    for r, lines in enumerate(row_text):
        for i, text in enumerate(lines):
            draw.text((PAD, top + PAD + i * line), text, fill=INK, font=font)
        for c in range(columns):
            cell = images[r][c]
            canvas.paste(Image.fromarray(cell), (label_width + c * width + (width - cell.shape[1]) // 2, top))
        top += heights[r]
    return np.asarray(canvas)
