"""A terminal progress bar for merges: tensors and bytes done, throughput, ETA."""

from __future__ import annotations

import time
from typing import TextIO

from .passes import Progress


class ProgressBar:
    """Redraws in place on a terminal; elsewhere (logs, pipes) prints a line every few seconds."""

    def __init__(self, stream: TextIO, width: int = 28, interval: float = 0.2):
        self.stream = stream
        self.tty = stream.isatty()
        self.width = width
        self.interval = interval if self.tty else 5.0
        self.last = 0.0
        self.drawn = False
        self.ended = False

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        done = p.tensors_done >= p.tensors_total
        if (now - self.last < self.interval and not done) or (done and self.ended):
            return
        self.last, self.ended = now, done
        frac = p.bytes_read / p.bytes_total if p.bytes_total else 1.0
        filled = int(frac * self.width)
        rate = p.bytes_read / p.elapsed / 1e9 if p.elapsed > 0 else 0.0
        eta = f"{p.eta:.0f}s" if p.eta is not None else "?"
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {p.tensors_done}/{p.tensors_total} tensors "
                f"{p.bytes_read / 1e9:.2f}/{p.bytes_total / 1e9:.2f} GB read {rate:.2f} GB/s ETA {eta}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
