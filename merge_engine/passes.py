"""One streaming pass over many checkpoints, on a few threads: what merges and analyses share.

A pass hands work to `threads` worker threads (`work(index)`), stops them all at the first
error or when the caller cancels, reports progress, and every `SWEEP_BYTES` read unmaps what
the inputs have mapped (mapped pages count towards RSS until unmapped).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint
from .errors import MergeCancelled, OptionsError, SdmergeError

if TYPE_CHECKING:  # a linear merge on the native kernel runs without torch
    import torch

SWEEP_BYTES = 128 << 20  # input bytes read between unmapping everything read


@dataclass(frozen=True)
class Progress:
    tensors_done: int
    tensors_total: int
    bytes_read: int
    bytes_total: int
    elapsed: float

    @property
    def eta(self) -> float | None:
        if not self.bytes_read:
            return None
        return self.elapsed * (self.bytes_total - self.bytes_read) / self.bytes_read


def torch_device(name: str, error: type[SdmergeError] = OptionsError) -> torch.device:
    """A device name as torch's device, or `error` saying what is wrong with it."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise error(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def thread_count(threads: int) -> int:
    """0 means one per core, at most 4: the work is memory-bound beyond that."""
    return threads or max(1, min(4, os.cpu_count() or 1))


class StreamingPass:
    def __init__(self, checkpoints: Sequence[Checkpoint], threads: int, tensors_total: int, bytes_total: int,
                 progress: Callable[[Progress], None] | None, should_cancel: Callable[[], bool] | None,
                 what: str):
        self.checkpoints, self.threads = checkpoints, thread_count(threads)
        self.tensors_total, self.bytes_total = tensors_total, bytes_total
        self.report, self.should_cancel, self.what = progress, should_cancel, what
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.error: BaseException | None = None
        self.bytes_read = self.swept = self.tensors_done = 0
        self.touched = 0  # bytes read, re-reads by multi-pass methods included: what the mappings hold
        self.started = time.perf_counter()

    def work(self, index: int) -> None:
        raise NotImplementedError

    def after_sweep(self) -> None:
        """Called (outside the lock) after the inputs were unmapped."""

    def run_threads(self) -> None:
        # The pass parallelises across chunks; torch's own threads on top of that only contend.
        # The loops make no reference cycles, and collections would scan every chunk's views.
        # A pass that has not imported torch has no torch threads to quiet.
        torch = sys.modules.get("torch")
        intra_op, collecting = torch.get_num_threads() if torch else 0, gc.isenabled()
        if torch:
            torch.set_num_threads(1)
        gc.disable()
        try:
            workers = [threading.Thread(target=self._guarded, args=(i,), daemon=True) for i in range(self.threads)]
            for worker in workers:
                worker.start()
            while alive := [w for w in workers if w.is_alive()]:
                alive[0].join(0.1)
                if self.should_cancel is not None and not self.stop.is_set() and self.should_cancel():
                    self.error = self.error or MergeCancelled(f"the {self.what} was cancelled")
                    self.stop.set()
                self.progress()
        finally:
            if torch:
                torch.set_num_threads(intra_op)
            if collecting:
                gc.enable()
        if self.error is not None:
            raise self.error
        self.progress()

    def advance(self, nbytes: int, tensor_done: bool) -> None:
        with self.lock:
            self.bytes_read += nbytes
            self.tensors_done += tensor_done
        self.reread(nbytes)

    def reread(self, nbytes: int) -> None:
        """`nbytes` more read through the mappings (progress or not): unmap every SWEEP_BYTES."""
        with self.lock:
            self.touched += nbytes
            sweep = self.touched - self.swept >= SWEEP_BYTES
            if sweep:
                self.swept = self.touched
        if sweep:
            for checkpoint in self.checkpoints:
                checkpoint.release()
            self.after_sweep()

    def progress(self) -> None:
        if self.report is not None:
            self.report(Progress(self.tensors_done, self.tensors_total, self.bytes_read, self.bytes_total,
                                 time.perf_counter() - self.started))

    def _guarded(self, index: int) -> None:
        try:
            self.work(index)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            with self.lock:
                self.error = self.error or exc
            self.stop.set()
