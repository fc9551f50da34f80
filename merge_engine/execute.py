"""Execution: stream a plan into a safetensors file, tensor by tensor, chunk by chunk.

Memory does not grow with the number of models or their size: a few worker threads take
(key, chunk) items in output order, each sums its chunk with its own cache-sized buffers
(accumulate.py), rounds once to the output dtype, and puts the bytes at the offset the plan laid
out, in the output's blocks (output.py). Threads need no ordering, and the bytes are the same
whatever the thread count.

A merge the native kernel serves whole (every key linear or integer, fp16/bf16/fp32 tensors, fp32
sums, on the CPU) never imports torch: its sums are `kernels.NativeSum` on the mapped files, its
buffers plain memory (buffers.py). That saves a CLI merge the seconds `import torch` takes.

The file is written under a temporary name, fsynced and renamed: a crash or an error never
leaves a file that looks complete, and nothing is left behind. Before the rename, every input is
checked to be the version that was hashed (`check_inputs_unchanged`), so the provenance the
output records is true.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import kernels
from .buffers import address_of
from .checkpoint import ITEMSIZE
from .errors import InputChangedError, LayoutMismatchError, OptionsError, RecipeError, StorageError
from .hashing import sha256_fd
from .labels import seal
from .output import ALIGN, BLOCK_BYTES, BlockWriter
from .passes import Progress, StreamingPass, thread_count, torch_device
from .plan import KeyPlan, Plan

if TYPE_CHECKING:  # a merge the native kernel serves whole never imports torch (see NativeAccumulator)
    import torch

    from .accumulate import CpuAccumulator

CHUNK_ELEMENTS = 1 << 21  # per item: few enough Python calls that their cost is lost in the arithmetic
DEVICE_CHUNK_ELEMENTS = 1 << 22  # on a GPU, fewer and bigger reads and copies win
ITEM_INPUT_BYTES = 16 << 20  # on a CPU, chunks shrink as models are added: 2Mi elements of 4 fp16 models
MIN_CHUNK_ELEMENTS = 1 << 14


@dataclass(frozen=True)
class ExecOptions:
    threads: int = 0  # 0: one per core, at most 4 (the work is memory-bound beyond that)
    device: str = "cpu"
    chunk_elements: int = CHUNK_ELEMENTS
    block_bytes: int = BLOCK_BYTES  # the output is written in blocks of this size (a multiple of 4 KiB)
    # Also hash every input during the pass, from the file the merge reads, and compare with its
    # recorded sha256. Every input's version is checked after the pass in any case; this catches
    # what timestamps cannot (a network file system's stale attributes), at the cost of a sha256 of
    # every input (about 1.4 GB/s per core), in threads beside the merge.
    verify_inputs: bool = False

    def torch_device(self) -> torch.device:
        return torch_device(self.device)

    def check(self) -> None:
        """Impossible options fail before anything is written."""
        if self.device != "cpu":
            self.torch_device()
        if self.chunk_elements < 1:
            raise OptionsError(f"chunk_elements must be at least 1, not {self.chunk_elements}")
        if self.block_bytes < ALIGN or self.block_bytes % ALIGN:
            raise OptionsError(f"block_bytes must be a positive multiple of {ALIGN}, not {self.block_bytes}")


@dataclass(frozen=True)
class MergeResult:
    path: Path
    size: int
    sha256: str | None
    metadata: dict[str, str]
    seconds: float
    autov3: str | None = None  # the data section's sha256, as modelspec.hash_sha256 records it


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
    options.check()
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
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)  # read back by the seal
        except OSError as exc:
            raise StorageError(f"cannot write the output in {exc.filename or output.parent}: {exc.strerror}",
                               model=output.name) from None
        try:
            _reserve(fd, plan.output_size, output)
            # With a ModelSpec hash slot the blocks give the data section's sha256 (AutoV3) as they go
            # out, and the whole file's is read back after the seal; without one, the file's directly.
            sealed = plan.hash_slot is not None
            hash_from = len(plan.header) if sealed else 0 if compute_sha256 else None
            writer = BlockWriter(fd, plan.output_size, threads=thread_count(options.threads),
                                 hash_from=hash_from, name=output.name, block_bytes=options.block_bytes)
            digest = write_pass(plan, writer, options, progress, should_cancel, header=True)
            autov3 = None
            if sealed:
                autov3, digest = seal(fd, plan, autov3=digest, sha256=compute_sha256)
            os.fsync(fd)
        finally:
            os.close(fd)
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
    return MergeResult(output, plan.output_size, digest, plan.sealed_metadata(autov3), time.perf_counter() - started,
                       autov3)


def write_pass(plan: Plan, writer: BlockWriter, options: ExecOptions, progress: Callable[[Progress], None] | None,
               should_cancel: Callable[[], bool] | None, *, header: bool = False,
               keys: Sequence[KeyPlan] | None = None, inputs: Sequence[int] | None = None) -> str | None:
    """One pass of the plan's keys (or `keys`, which read `inputs`) into `writer`, the header
    first if asked; every input read is then checked to be the version that was hashed (and its
    bytes hashed alongside, with `verify_inputs`). Returns the writer's digest."""
    verifier = _InputHashes(plan, inputs) if options.verify_inputs else None
    try:
        if header:
            writer.put(0, plan.header)
        _Run(plan, writer, options, progress, should_cancel, keys=keys).run_threads()
        digest = writer.finish()
    except BaseException:
        writer.abort()
        if verifier:
            verifier.stop()
        raise
    if verifier:
        verifier.check()
    check_inputs_unchanged(plan, inputs)
    return digest


def check_inputs_unchanged(plan: Plan, inputs: Iterable[int] | None = None) -> None:
    """The proof that the output is what its recorded input hashes say: no input was written to,
    truncated or replaced while the pass read it (each is still the version that was hashed).
    `inputs`: only these (indexes into plan.inputs), e.g. those a shard read."""
    for index in range(len(plan.inputs)) if inputs is None else inputs:
        plan.inputs[index].checkpoint.check_unchanged()


def inputs_of(keys: Iterable[KeyPlan]) -> list[int]:
    """The inputs (indexes into plan.inputs) that these keys read, in order."""
    return sorted({term.input for key in keys for term in key.terms})


def bytes_to_read(plan: Plan, keys: Iterable[KeyPlan]) -> int:
    """What producing these keys reads from the inputs (Plan.bytes_to_read for all of them)."""
    return sum(plan.inputs[t.input].checkpoint.tensors[t.key].nbytes for k in keys for t in k.terms)


class _InputHashes:
    """sha256 of each input, computed while the merge runs from the same open files."""

    def __init__(self, plan: Plan, inputs: Sequence[int] | None = None) -> None:
        self.items = list(plan.inputs) if inputs is None else [plan.inputs[i] for i in inputs]
        self.stopped = threading.Event()
        self.pool = ThreadPoolExecutor(max(1, len(self.items)), thread_name_prefix="verify")
        self.pending = [self.pool.submit(self._hash, item.checkpoint) for item in self.items]

    def _hash(self, checkpoint) -> str | None:
        if checkpoint.fileno() is not None:
            return sha256_fd(checkpoint.fileno(), checkpoint.size, self.stopped.is_set)
        with open(checkpoint.path, "rb", buffering=0) as f:
            return sha256_fd(f.fileno(), checkpoint.size, self.stopped.is_set)

    def stop(self) -> None:
        self.stopped.set()
        self.pool.shutdown(wait=True)

    def check(self) -> None:
        try:
            for item, pending in zip(self.items, self.pending, strict=True):
                if pending.result() != item.sha256:
                    raise InputChangedError("the file's bytes no longer have its recorded sha256: it changed "
                                            "before or while it was read", model=item.name,
                                            details={"path": str(item.path), "recorded": item.sha256})
        finally:
            self.stop()


class _Run(StreamingPass):
    """One execution: (key, chunk) items taken in output order by a few threads. `keys` limits it
    to a run of the plan's keys (a shard, merge_engine/shards.py); by default it is all of them."""

    def __init__(self, plan: Plan, writer: BlockWriter, options: ExecOptions,
                 progress: Callable[[Progress], None] | None, should_cancel: Callable[[], bool] | None,
                 keys: Sequence[KeyPlan] | None = None):
        if keys is None:
            keys, checkpoints, bytes_total = plan.keys, [i.checkpoint for i in plan.inputs], plan.bytes_to_read
        else:
            checkpoints = [plan.inputs[i].checkpoint for i in inputs_of(keys)]
            bytes_total = bytes_to_read(plan, keys)
        super().__init__(checkpoints, options.threads, len(keys), bytes_total, progress, should_cancel, "merge")
        self.plan, self.writer, self.options, self.keys = plan, writer, options, keys
        self.data_start = len(plan.header)
        self.fp64 = plan.recipe.output.accumulate == "fp64"
        self.check_finite = plan.recipe.output.non_finite == "error"
        self.on_cpu = options.device == "cpu" or options.torch_device().type == "cpu"
        self.chunk = options.chunk_elements
        if not self.on_cpu and options.chunk_elements == CHUNK_ELEMENTS:
            self.chunk = DEVICE_CHUNK_ELEMENTS
        self.native_only = self.on_cpu and not self.fp64 and kernels.native() is not None and all(
            key.kind == "integer" or kernels.serves(plan, key) for key in keys)
        self.items = self._items()

    def _items(self) -> Iterator[tuple[KeyPlan, int, int, bool]]:
        """(key, start, stop, last) in file order. A chunk that would cross a boundary between the
        writer's blocks ends there instead (where the boundary falls between two elements), so
        nearly every chunk is rounded straight into its block."""
        block = self.writer.block
        for key in self.keys:
            if key.kind == "integer" or key.numel == 0 or key.expression is not None:
                yield key, 0, key.numel, True  # a non-linear key is one item: its passes run in order
                continue
            step = self.chunk
            if self.on_cpu:  # the input mapped for one item stays the same size whatever the model count
                step = min(step, max(MIN_CHUNK_ELEMENTS, ITEM_INPUT_BYTES // self._input_bytes_per_element(key)))
            size, base = ITEMSIZE[key.dtype], self.data_start + key.offset
            start = 0
            while start < key.numel:
                stop = min(start + step, key.numel)
                boundary = (base + start * size) // block * block + block
                if base + stop * size > boundary and (boundary - base) % size == 0:
                    stop = (boundary - base) // size
                yield key, start, stop, stop == key.numel
                start = stop

    def work(self, index: int) -> None:
        accumulator = self._accumulator()
        while not self.stop.is_set():
            with self.lock:
                item = next(self.items, None)
            if item is None:
                return
            key, start, stop, last = item
            if key.expression is not None:
                self._nonlinear(key, accumulator)
                continue
            size = ITEMSIZE[key.dtype]
            offset, nbytes = self.data_start + key.offset + start * size, (stop - start) * size
            into = self.writer.claim(offset, nbytes, size) if key.kind == "float" and self.on_cpu else None
            if into is not None:
                accumulator.sum_chunk(key, start, stop, into)
                self.writer.commit(offset, nbytes)
            else:
                self.writer.put(offset, self._integer(key) if key.kind == "integer"
                                else accumulator.sum_chunk(key, start, stop))
            self.advance((stop - start) * self._input_bytes_per_element(key), last)

    def _nonlinear(self, key: KeyPlan, accumulator: CpuAccumulator) -> None:
        import torch

        from .evaluate import KeyEvaluation

        evaluation = KeyEvaluation(self.plan, key, accumulator, torch.float64 if self.fp64 else torch.float32,
                                   self.options.torch_device(), self.chunk, self.check_finite, self.reread)
        base, per_element = self.data_start + key.offset, self._input_bytes_per_element(key)
        for start, stop, data in evaluation.results(self.stop.is_set):
            self.writer.put(base + start * ITEMSIZE[key.dtype], data)
            self.advance((stop - start) * per_element, stop == key.numel)
        if key.numel == 0:
            self.advance(0, True)

    def _input_bytes_per_element(self, key: KeyPlan) -> int:
        return sum(ITEMSIZE[self.plan.inputs[t.input].checkpoint.tensors[t.key].dtype] for t in key.terms)

    def _accumulator(self) -> CpuAccumulator | NativeAccumulator:
        if self.native_only:
            return NativeAccumulator(self.plan, self.chunk, self.check_finite)
        import torch

        from .accumulate import CpuAccumulator, DeviceAccumulator

        args = (self.plan, torch.float64 if self.fp64 else torch.float32, self.chunk, self.check_finite)
        if self.on_cpu:
            return CpuAccumulator(*args)
        return DeviceAccumulator(*args, self.options.torch_device())

    def _integer(self, key: KeyPlan) -> bytes:
        """An integer tensor's bytes, which every source must agree on (by value, whatever its
        integer type: some files store position_ids as int32, others as int64)."""
        first_bytes, first = self._integer_values(key.terms[0])
        name = self.plan.inputs[key.terms[0].input].name
        for term in key.terms[1:]:
            if self._integer_values(term)[1] != first:
                raise LayoutMismatchError(f"integer tensor differs from {name}'s; integers are never averaged",
                                          model=self.plan.inputs[term.input].name, component=key.component, key=key.key)
        return first_bytes

    def _integer_values(self, term: Any) -> tuple[bytes, memoryview | bytes]:
        checkpoint = self.plan.inputs[term.input].checkpoint
        data = checkpoint.read_bytes(term.key)
        return data, memoryview(data).cast(INTEGER_FORMATS.get(checkpoint.tensors[term.key].dtype, "B"))


INTEGER_FORMATS = {"I64": "q", "I32": "i", "I16": "h", "I8": "b", "U8": "B", "BOOL": "?", "U16": "H", "U32": "I",
                   "U64": "Q"}  # struct formats: values compare equal across integer types


class NativeAccumulator:
    """The accumulator of a merge the native kernel serves whole (fp16/bf16/fp32, fp32 sums,
    linear keys, on the CPU): kernels.NativeSum, and no torch. Torch comes in only to name the
    model at fault when an input holds NaN or Inf."""

    def __init__(self, plan: Plan, chunk: int, check_finite: bool):
        self.plan, self.chunk, self.check_finite = plan, chunk, check_finite
        self.sums = kernels.NativeSum(plan, chunk, check_finite)

    def sum_chunk(self, key: KeyPlan, start: int, stop: int, into: memoryview | None = None) -> memoryview:
        if into is None:
            into = self.sums.output().view[: (stop - start) * ITEMSIZE[key.dtype]]
        if not self.sums.sum_at(key, start, stop, address_of(into)):
            import torch

            from .accumulate import CpuAccumulator  # raises NonFiniteError naming the input

            CpuAccumulator(self.plan, torch.float32, self.chunk, True).sum_torch(
                key, start, stop, torch.frombuffer(into, dtype=torch.uint8))
        return into


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
