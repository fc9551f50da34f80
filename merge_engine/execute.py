"""Execution: stream a plan into a safetensors file, tensor by tensor, chunk by chunk.

Memory does not grow with the number of models or their size: a few worker threads take
(key, chunk) items in output order, each sums its chunk with its own cache-sized buffers
(accumulate.py), rounds once to the output dtype, and writes the bytes with a positioned write
at the offset the plan laid out. Threads need no ordering, and the bytes are the same whatever
the thread count.

The file is written under a temporary name, fsynced and renamed: a crash or an error never
leaves a file that looks complete, and nothing is left behind.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .accumulate import CpuAccumulator, DeviceAccumulator
from .checkpoint import ITEMSIZE
from .errors import LayoutMismatchError, RecipeError, StorageError
from .passes import Progress, StreamingPass, torch_device
from .plan import KeyPlan, Plan

CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32: stays in cache between the widen and the add
DEVICE_CHUNK_ELEMENTS = 1 << 22  # on a GPU, fewer and bigger reads and copies win
HASH_BLOCK = 16 << 20


@dataclass(frozen=True)
class ExecOptions:
    threads: int = 0  # 0: one per core, at most 4 (the work is memory-bound beyond that)
    device: str = "cpu"
    chunk_elements: int = CHUNK_ELEMENTS

    def torch_device(self) -> torch.device:
        return torch_device(self.device)


@dataclass(frozen=True)
class MergeResult:
    path: Path
    size: int
    sha256: str | None
    metadata: dict[str, str]
    seconds: float


def merge(
    plan: Plan,
    output_path: str | os.PathLike[str],
    *,
    options: ExecOptions = ExecOptions(),
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    tmp_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    compute_sha256: bool = False,
) -> MergeResult:
    options.torch_device()  # an impossible device fails before anything is written
    output = Path(output_path).absolute()
    if any(output.resolve() == item.path for item in plan.inputs):
        raise RecipeError("the recipe references its own output file", model=output.name)
    if output.is_dir():
        raise RecipeError(f"output {output} is a folder; give the file to write, e.g. {output / 'merged.safetensors'}")
    if output.exists() and not overwrite:
        raise RecipeError(f"output {output} already exists (use overwrite)")
    tmp_parent = Path(tmp_dir) if tmp_dir else output.parent
    partial = tmp_parent / f".{output.name}.{os.getpid()}.{threading.get_ident()}.partial"
    created: list[Path] = []
    started = time.perf_counter()
    try:
        try:
            created = _make_parents(output.parent)
            tmp_parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot write the output in {exc.filename or output.parent}: {exc.strerror}",
                               model=output.name) from None
        hasher = _OutputHasher(partial, len(plan.header), plan.output_size) if compute_sha256 else None
        try:
            _reserve(fd, plan.output_size, output)
            os.pwrite(fd, plan.header, 0)
            _Run(plan, fd, options, progress, should_cancel, hasher).run_threads()
            os.fsync(fd)
        finally:
            os.close(fd)
            digest = hasher.finish() if hasher else None
        os.replace(partial, output)
        _fsync_dir(output.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return MergeResult(output, plan.output_size, digest, plan.metadata, time.perf_counter() - started)


class _Run(StreamingPass):
    """One execution: (key, chunk) items taken in output order by a few threads."""

    def __init__(self, plan: Plan, fd: int, options: ExecOptions,
                 progress: Callable[[Progress], None] | None, should_cancel: Callable[[], bool] | None,
                 hasher: _OutputHasher | None = None):
        super().__init__([i.checkpoint for i in plan.inputs], options.threads, len(plan.keys),
                         plan.bytes_to_read, progress, should_cancel, "merge")
        self.plan, self.fd, self.options, self.hasher = plan, fd, options, hasher
        self.data_start = len(plan.header)
        self.acc_dtype = torch.float64 if plan.recipe.output.accumulate == "fp64" else torch.float32
        self.check_finite = plan.recipe.output.non_finite == "error"
        self.device = options.torch_device()
        self.chunk = options.chunk_elements
        if self.device.type != "cpu" and options.chunk_elements == CHUNK_ELEMENTS:
            self.chunk = DEVICE_CHUNK_ELEMENTS
        self.items = enumerate(self._items())
        self.finished: dict[int, int] = {}  # item index -> its end in the file, done out of order
        self.next_unfinished = 0

    def _items(self) -> Iterator[tuple[KeyPlan, int, int, bool]]:
        step = self.chunk
        for key in self.plan.keys:
            if key.kind == "integer" or key.numel <= step:
                yield key, 0, key.numel, True
                continue
            for start in range(0, key.numel, step):
                stop = min(start + step, key.numel)
                yield key, start, stop, stop == key.numel

    def work(self, index: int) -> None:
        accumulator = self._accumulator()
        while not self.stop.is_set():
            with self.lock:
                number, item = next(self.items, (None, None))
            if item is None:
                return
            key, start, stop, last = item
            data = self._integer(key) if key.kind == "integer" else accumulator.sum_chunk(key, start, stop)
            os.pwrite(self.fd, memoryview(data.numpy()), self.data_start + key.offset + start * ITEMSIZE[key.dtype])
            with self.lock:
                self._finished(number, self.data_start + key.offset + stop * ITEMSIZE[key.dtype])
            self.advance(sum((stop - start) * ITEMSIZE[self.plan.inputs[t.input].checkpoint.tensors[t.key].dtype]
                             for t in key.terms), last)

    def after_sweep(self) -> None:
        start_writeback(self.fd)

    def _finished(self, index: int, end: int) -> None:
        """Items finish nearly in order; the output is complete up to the first unfinished one."""
        self.finished[index] = end
        complete = None
        while self.next_unfinished in self.finished:
            complete = self.finished.pop(self.next_unfinished)
            self.next_unfinished += 1
        if complete is not None and self.hasher is not None:
            self.hasher.advance(complete)

    def _accumulator(self) -> CpuAccumulator:
        args = (self.plan, self.acc_dtype, self.chunk, self.check_finite)
        if self.device.type == "cpu":
            return CpuAccumulator(*args)
        return DeviceAccumulator(*args, self.device)

    def _integer(self, key: KeyPlan) -> torch.Tensor:
        values = [(t, self.plan.inputs[t.input].checkpoint.read_tensor(t.key)) for t in key.terms]
        first_term, first = values[0]
        for term, value in values[1:]:
            if not torch.equal(value, first):
                raise LayoutMismatchError(
                    f"integer tensor differs from {self.plan.inputs[first_term.input].name}'s; integers are never averaged",
                    model=self.plan.inputs[term.input].name, component=key.component, key=key.key,
                )
        return first.reshape(-1).contiguous().view(torch.uint8)


def _reserve(fd: int, size: int, output: Path) -> None:
    """Claim the output's disk space up front: a full disk is a clear error now, not halfway."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"not enough disk space for the output ({size / 1e9:.2f} GB) in {output.parent}",
                               model=output.name) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # a file system without fallocate


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None


def start_writeback(fd: int) -> None:
    """Start writing the dirty pages out now, so the final fsync finds little left to do."""
    if (call := _sync_file_range()) is not None:
        call(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), ctypes.c_uint(2))  # SYNC_FILE_RANGE_WRITE


def _make_parents(folder: Path) -> list[Path]:
    created = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        created.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return created  # deepest first


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _OutputHasher:
    """sha256 of the output, computed while it is written: a thread follows the complete prefix
    of the file, reading it back from the page cache, so no second pass is needed at the end."""

    def __init__(self, path: Path, ready: int, size: int):
        self.fd = os.open(path, os.O_RDONLY)
        self.size = size
        self.ready = ready  # the header is written first
        self.hashed = 0
        self.digest = hashlib.sha256()
        self.changed = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def advance(self, complete: int) -> None:
        with self.changed:
            self.ready = max(self.ready, complete)
            self.changed.notify()

    def finish(self) -> str | None:
        """The digest once the whole file is hashed; None if the merge stopped early."""
        with self.changed:
            self.stopped = True
            self.changed.notify()
        self.thread.join()
        os.close(self.fd)
        return self.digest.hexdigest() if self.hashed == self.size else None

    def _follow(self) -> None:
        while True:
            with self.changed:
                while self.ready - self.hashed < HASH_BLOCK and self.ready < self.size and not self.stopped:
                    self.changed.wait()
                ready, stopped = self.ready, self.stopped
            while self.hashed < ready:
                block = os.pread(self.fd, min(HASH_BLOCK, ready - self.hashed), self.hashed)
                self.digest.update(block)
                self.hashed += len(block)
            if stopped or self.hashed >= self.size:
                return
