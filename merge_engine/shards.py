"""One merge split across processes or machines: shards of the output, each written on its own.

A merge is bound by reading its inputs (200 SDXL fine-tunes are 1.4 TB), and the plan already
knows every output offset. So the output's keys are cut into contiguous runs (`split`), balanced
by the bytes each reads; each shard reads only its keys' bytes and writes only its byte range of
one shared, pre-sized partial file (`prepare_partial`, `write_shard`), on any machine that
mounts it; a final step (`finish_sharded`) checks the file and every shard's digest, writes the
header, computes the file's sha256 in file order and publishes it by fsync and rename, as
`execute.merge` does. The bytes are those of a one-task merge, whatever the shard count: every
key is computed by the same code (`execute._Run` limited to the shard's keys) into the same
offsets.

A shard's edges fall inside the output's blocks: the writer owns only [start, end) of them and
writes the shared edge blocks' pieces without direct I/O (output.BlockWriter). A shard can be
re-run any number of times (a lost worker): it writes the same bytes to the same range.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import OptionsError, RecipeError, StorageError
from .execute import (
    ExecOptions,
    MergeResult,
    _fsync_dir,
    _make_parents,
    _reserve,
    bytes_to_read,
    inputs_of,
    write_pass,
)
from .labels import seal
from .output import BlockWriter
from .passes import Progress, thread_count
from .plan import Plan

READ_BACK_BYTES = 8 << 20
DEFAULT_OPTIONS = ExecOptions()


@dataclass(frozen=True)
class Shard:
    """Output keys [first, stop) of the plan, which fill the file's bytes [start, end)."""

    index: int
    first: int
    stop: int
    start: int
    end: int
    bytes_to_read: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def shard_count(plan: Plan, *, count: int = 0, target_bytes: int = 0) -> int:
    """`count` if given, else one shard per `target_bytes` read (at least one); never more
    shards than keys."""
    if count < 0 or target_bytes < 0:
        raise OptionsError("a shard count and a shard size cannot be negative")
    if not count:
        count = math.ceil(plan.bytes_to_read / target_bytes) if target_bytes else 1
    return max(1, min(count, len(plan.keys)))


def split(plan: Plan, count: int = 0, *, target_bytes: int = 0) -> list[Shard]:
    """Contiguous runs of the plan's keys, balanced by the bytes each reads; deterministic from
    the plan. Each shard holds at least one key; the data section is covered exactly once."""
    count = shard_count(plan, count=count, target_bytes=target_bytes)
    costs = [bytes_to_read(plan, [key]) for key in plan.keys]
    total, data_start = sum(costs), len(plan.header)
    cuts, done = [0], 0
    for index, cost in enumerate(costs):
        remaining = count - len(cuts)  # cuts still to make after this key
        if remaining <= 0:
            break
        done += cost
        keys_left = len(costs) - index - 1
        # Cut after this key once the running total reaches its share, or when every later key
        # must start a shard of its own.
        if keys_left and (done * count >= total * len(cuts) or keys_left <= remaining):
            cuts.append(index + 1)
    cuts.append(len(plan.keys))
    shards = []
    for index, (first, stop) in enumerate(zip(cuts, cuts[1:], strict=False)):
        start = data_start + plan.keys[first].offset
        end = data_start + plan.keys[stop].offset if stop < len(plan.keys) else plan.output_size
        shards.append(Shard(index, first, stop, start, end, sum(costs[first:stop])))
    return shards


def check_shard(plan: Plan, shard: Shard) -> None:
    """The shard is one `split` could have made of this plan (its keys fill its byte range)."""
    keys, data_start = plan.keys, len(plan.header)
    ok = 0 <= shard.first < shard.stop <= len(keys) and shard.start == data_start + keys[shard.first].offset and (
        shard.end == (data_start + keys[shard.stop].offset if shard.stop < len(keys) else plan.output_size))
    if not ok:
        raise OptionsError(f"shard {shard.index} (keys {shard.first}..{shard.stop}, bytes {shard.start}.."
                           f"{shard.end}) does not fit this plan's output layout", details=shard.to_dict())


def prepare_partial(plan: Plan, partial_path: str | os.PathLike[str]) -> Path:
    """Create the shared partial file at its full size (the disk space claimed up front)."""
    partial = Path(partial_path)
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot create the shared partial file {partial}: {exc.strerror}",
                           model=partial.name) from None
    try:
        _reserve(fd, plan.output_size, partial)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        partial.unlink(missing_ok=True)
        raise
    os.close(fd)
    return partial


def write_shard(plan: Plan, partial_path: str | os.PathLike[str], shard: Shard, *,
                options: ExecOptions = DEFAULT_OPTIONS, progress: Callable[[Progress], None] | None = None,
                should_cancel: Callable[[], bool] | None = None) -> str:
    """Compute the shard's keys into its byte range of the shared partial file, reading only
    the inputs those keys need; fsynced before it returns. Returns the sha256 of the range."""
    options.check()
    check_shard(plan, shard)
    partial = Path(partial_path)
    keys = plan.keys[shard.first:shard.stop]
    used = inputs_of(keys)
    fd = _open_partial(plan, partial, os.O_WRONLY)
    try:
        edge_fd = os.open(partial, os.O_WRONLY)
        try:
            writer = BlockWriter(fd, plan.output_size, threads=thread_count(options.threads), hash_from=0,
                                 name=partial.name, block_bytes=options.block_bytes, start=shard.start,
                                 end=shard.end, edge_fd=edge_fd)
            digest = write_pass(plan, writer, options, progress, should_cancel, keys=keys, inputs=used)
            os.fsync(edge_fd)
        finally:
            os.close(edge_fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert digest is not None
    return digest


def finish_sharded(plan: Plan, partial_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
                   shards: Sequence[Shard], digests: Sequence[str | None] | None = None, *,
                   overwrite: bool = False) -> MergeResult:
    """Once every shard is written: check the file (its size; each shard's range against the
    sha256 its writer recorded, where given), write the header, compute the sha256 of the whole
    file in file order, and publish it at `output_path` by fsync and rename. On an error the
    partial file is left to the caller (a shard can be re-run)."""
    started = time.perf_counter()
    partial, output = Path(partial_path), Path(output_path).absolute()
    if [s.index for s in shards] != list(range(len(shards))) or not shards:
        raise OptionsError("finish_sharded needs every shard of the split, in order")
    for shard in shards:
        check_shard(plan, shard)
    if shards[0].start != len(plan.header) or shards[-1].end != plan.output_size or any(
            a.end != b.start for a, b in zip(shards, shards[1:], strict=False)):
        raise OptionsError("the shards do not cover the output's data exactly once")
    if digests is not None and len(digests) != len(shards):
        raise OptionsError(f"{len(digests)} shard digests for {len(shards)} shards")
    if output.exists() and not overwrite:
        raise RecipeError(f"output {output} already exists (use overwrite)")
    fd = _open_partial(plan, partial, os.O_RDWR)
    try:
        _pwrite_all(fd, plan.header, 0)
        ranges = [(s.start, s.end) for s in shards] if digests is not None else []
        # One read in file order: the whole file's sha256, or, where the header reserves the
        # ModelSpec hash, the data section's (AutoV3), which the seal writes in before it reads the
        # file once more for the whole file's sha256 (labels.py). Each shard's digest on the way.
        sealed = plan.hash_slot is not None
        digest, found = _read_back(fd, len(plan.header) if sealed else 0, plan.output_size, ranges)
        for shard, expected, got in zip(shards, digests or (), found, strict=False):
            if expected is not None and expected != got:
                raise StorageError(f"shard {shard.index}'s bytes are not those its writer recorded: the shared "
                                   "file changed after it was written", model=partial.name,
                                   details={"shard": shard.index, "recorded": expected, "found": got})
        autov3, sha256 = seal(fd, plan, autov3=digest) if sealed else (None, digest)
        os.fsync(fd)
    finally:
        os.close(fd)
    _make_parents(output.parent)
    os.replace(partial, output)
    _fsync_dir(output.parent)
    return MergeResult(output, plan.output_size, sha256, plan.sealed_metadata(autov3), time.perf_counter() - started,
                       autov3)


def _open_partial(plan: Plan, partial: Path, flags: int) -> int:
    """The shared partial file, open, once it is checked to have the plan's output size."""
    try:
        fd = os.open(partial, flags)
    except OSError as exc:
        raise StorageError(f"cannot open the shared partial file: {exc.strerror}", model=partial.name) from None
    size = os.fstat(fd).st_size
    if size != plan.output_size:
        os.close(fd)
        raise StorageError(f"the shared partial file is {size} bytes; the plan's output is {plan.output_size}",
                           model=partial.name)
    return fd


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _read_back(fd: int, first: int, size: int, ranges: Sequence[tuple[int, int]]) -> tuple[str, list[str]]:
    """The sha256 of the file's bytes [first, size) and of each range, in one read in file order.
    The ranges' digests are computed on a second thread (hashlib lets go of the GIL)."""
    whole = hashlib.sha256()
    parts = [hashlib.sha256() for _ in ranges]
    pending: list[Future[Any]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="shard-digests") as pool:
        offset = first
        while offset < size:
            data = os.pread(fd, min(READ_BACK_BYTES, size - offset), offset)
            if not data:
                raise StorageError(f"the shared partial file ended at {offset} of {size} bytes")
            if ranges:
                pending.append(pool.submit(_update_ranges, parts, ranges, offset, data))
                if len(pending) > 2:
                    pending.pop(0).result()
            whole.update(data)
            offset += len(data)
        for future in pending:
            future.result()
    return whole.hexdigest(), [p.hexdigest() for p in parts]


def _update_ranges(parts: list[Any], ranges: Sequence[tuple[int, int]], offset: int, data: bytes) -> None:
    view, end = memoryview(data), offset + len(data)
    for part, (start, stop) in zip(parts, ranges, strict=True):
        lo, hi = max(start, offset), min(stop, end)
        if lo < hi:
            part.update(view[lo - offset:hi - offset])
