"""Writing the output file: assembled in memory in aligned blocks, each written whole as soon as
every byte of it is in, with direct I/O where the file system allows it.

A merge writes gigabytes once and reads none of them back. Through the page cache the kernel
copies every byte and writes it back at the fsync; on the virtual machines we measured, that copy
cost more CPU than the merge arithmetic. With `O_DIRECT` the disk takes each block straight from
our buffer, and two writer threads keep two blocks in flight while the merge threads go on.
Where direct I/O is refused (tmpfs, some network file systems) the same blocks go through the
page cache, with writeback started as they go so the final fsync finds little left.

Chunks finish out of order on several threads, so a block is complete when the bytes put into it
add up to its length. At most `2 * threads + 6` blocks are held: a thread that needs a new block
while all are taken waits for one to be written. If asked, the sha256 of the file from a given
offset on (the whole file, or the data section after the header: labels.py) is computed from the
blocks in file order before their buffers are reused: nothing is read back.

A writer may own only a byte range [start, end) of a file that others write too (a shard of a
merge, merge_engine/shards.py). Blocks stay aligned to the file, so a block at either edge of
the range is shared with a neighbour: only this range's part of it is written, through a second
descriptor without direct I/O (`edge_fd`), and the neighbour's bytes are never touched.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from .buffers import HostBuffer
from .errors import StorageError

BLOCK_BYTES = 8 << 20
ALIGN = 4096  # direct I/O offsets, lengths and buffers are multiples of this
WRITER_THREADS = 2


class BlockWriter:
    def __init__(self, fd: int, size: int, *, threads: int, hash_from: int | None, name: str,
                 block_bytes: int = BLOCK_BYTES, start: int = 0, end: int | None = None,
                 edge_fd: int | None = None):
        self.fd, self.size, self.block, self.name = fd, size, block_bytes, name
        self.start, self.end = start, size if end is None else end
        if not 0 <= self.start <= self.end <= size:
            raise ValueError(f"range [{start}, {end}) is not inside a file of {size} bytes")
        self.edge_fd = fd if edge_fd is None else edge_fd  # a descriptor without O_DIRECT, for edge blocks
        self.direct = _set_direct(fd, True)
        self.changed = threading.Condition()
        self.open: dict[int, list] = {}  # block index -> [buffer, bytes filled]
        self.free: list[HostBuffer] = []
        self.maps: list[HostBuffer] = []  # every buffer, at most `limit` of them
        self.limit = 2 * threads + 6
        self.error: BaseException | None = None
        self.to_write: queue.SimpleQueue = queue.SimpleQueue()
        self.digest = hashlib.sha256() if hash_from is not None else None
        self.hash_from = hash_from or 0
        self.to_hash: dict[int, HostBuffer] = {}
        self.next_to_hash = self.start // self.block
        self.writers = [threading.Thread(target=self._write_blocks, daemon=True) for _ in range(WRITER_THREADS)]
        for writer in self.writers:
            writer.start()

    def claim(self, offset: int, nbytes: int, alignment: int) -> memoryview | None:
        """The block's own bytes for [offset, offset + nbytes), to compute a result straight into;
        None where the range crosses a block boundary or is not aligned (then use `put`).
        Call `commit` once they are written."""
        index, within = divmod(offset, self.block)
        if within + nbytes > self._span(index)[1] or within % alignment:
            return None
        return self._buffer(index).view[within:within + nbytes]

    def commit(self, offset: int, nbytes: int) -> None:
        """The bytes claimed at `offset` are in."""
        self._filled(offset // self.block, nbytes)

    def put(self, offset: int, data: Any) -> None:
        """Place `data` (bytes-like, or a CPU uint8 tensor) at `offset` in the file."""
        data = memoryview(data.numpy() if hasattr(data, "numpy") else data).cast("B")
        done = 0
        while done < len(data):
            index, within = divmod(offset + done, self.block)
            n = min(len(data) - done, self.block - within)
            self._buffer(index).view[within:within + n] = data[done:done + n]
            self._filled(index, n)
            done += n

    def finish(self) -> str | None:
        """Wait until every block is written; cut the file to its size. The sha256 from `hash_from` if asked."""
        self._stop_writers()
        if self.error is not None:
            raise self.error
        if self.open:
            raise RuntimeError(f"output blocks {sorted(self.open)} were never completed")  # a bug, not bad input
        if self.direct and self.size % ALIGN and self.end == self.size and self.start < self.end:
            os.ftruncate(self.fd, self.size)  # the last block was written padded to the alignment
        self._release_maps()
        return self.digest.hexdigest() if self.digest is not None else None

    def abort(self) -> None:
        """Stop the writers after an error elsewhere; the file is being thrown away."""
        with self.changed:
            self.error = self.error or StorageError("the merge stopped", model=self.name)
            self.changed.notify_all()
        self._stop_writers()
        self._release_maps()

    def _span(self, index: int) -> tuple[int, int]:
        """The part of block `index` this writer owns: [lo, hi) within the block."""
        base = index * self.block
        return max(self.start - base, 0), min(self.block, self.end - base)

    def _length(self, index: int) -> int:
        lo, hi = self._span(index)
        return hi - lo

    def _buffer(self, index: int) -> HostBuffer:
        with self.changed:
            while True:
                if self.error is not None:
                    raise self.error
                if index in self.open:
                    return self.open[index][0]
                # The block the sha256 waits for always gets a buffer: every other buffer may be
                # held by later blocks, written and waiting to be hashed after this one.
                if self.free or len(self.maps) < self.limit or (self.digest is not None and index == self.next_to_hash):
                    break
                self.changed.wait()
            buffer = self.free.pop() if self.free else self._allocate()
            self.open[index] = [buffer, 0]
            return buffer

    def _allocate(self) -> HostBuffer:
        buffer = HostBuffer(self.block)  # page-aligned, as direct I/O needs
        self.maps.append(buffer)
        return buffer

    def _filled(self, index: int, n: int) -> None:
        with self.changed:
            entry = self.open[index]
            entry[1] += n
            if entry[1] < self._length(index):
                return
            del self.open[index]
        self.to_write.put((index, entry[0]))

    def _write_blocks(self) -> None:
        while (item := self.to_write.get()) is not None:
            index, buffer = item
            try:
                self._write(index, buffer)
            except Exception as exc:  # noqa: BLE001 - handed to the merge threads, which wait on this one
                with self.changed:
                    self.error = self.error or (_storage_error(exc, self.name) if isinstance(exc, OSError) else exc)
                    self.changed.notify_all()
            self._written(index, buffer)

    def _write(self, index: int, buffer: HostBuffer) -> None:
        if self.error is not None:
            return
        lo, hi = self._span(index)
        if lo or (hi < self.block and index * self.block + hi < self.size):
            self._write_edge(index * self.block + lo, buffer.view[lo:hi])
            return
        length, offset = hi, index * self.block
        if self.direct:
            length += -length % ALIGN
        view = buffer.view[:length]
        done = 0
        while done < length:
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                # The file system takes O_DIRECT at open but not these writes: go through the cache.
                self.direct = _set_direct(self.fd, False)
                length = self._length(index)
                view = view[:length]
        if not self.direct:
            start_writeback(self.fd)

    def _write_edge(self, offset: int, view: memoryview) -> None:
        """A block shared with a neighbouring range: only our bytes, through the page cache."""
        done = 0
        while done < len(view):
            done += os.pwrite(self.edge_fd, view[done:], offset + done)

    def _written(self, index: int, buffer: HostBuffer) -> None:
        if self.digest is None or self.error is not None:
            self._recycle(buffer)
            return
        with self.changed:
            self.to_hash[index] = buffer
            if index != self.next_to_hash:
                return
        # This thread hashes the run of blocks now in order; the other writer goes on writing.
        while True:
            with self.changed:
                buffer = self.to_hash.pop(self.next_to_hash, None)
                if buffer is None:
                    return
                lo, hi = self._span(self.next_to_hash)
                lo = max(lo, self.hash_from - self.next_to_hash * self.block)
            if hi > lo:
                self.digest.update(buffer.view[lo:hi])
            with self.changed:
                self.next_to_hash += 1
            self._recycle(buffer)

    def _recycle(self, buffer: HostBuffer) -> None:
        with self.changed:
            self.free.append(buffer)
            self.changed.notify_all()

    def _stop_writers(self) -> None:
        for _ in self.writers:
            self.to_write.put(None)
        for writer in self.writers:
            writer.join()

    def _release_maps(self) -> None:
        self.free.clear()
        self.open.clear()
        self.to_hash.clear()
        for buffer in self.maps:
            buffer.close()
        self.maps.clear()


def _set_direct(fd: int, on: bool) -> bool:
    """Turn direct I/O on or off for `fd`; whether it is now on."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return on and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & flag)


def _storage_error(exc: OSError, name: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError("the disk is full", model=name)
    return StorageError(f"cannot write the output: {exc.strerror}", model=name)


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
