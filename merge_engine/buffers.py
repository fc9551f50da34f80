"""Page-aligned host memory with its address, for the native kernels and direct I/O, without torch."""

from __future__ import annotations

import ctypes
import mmap


def address_of(view: memoryview | mmap.mmap) -> int:
    """The address of a writable buffer's first byte (valid while the buffer lives)."""
    probe = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe  # the export ends here, so the mapping can still be closed


class HostBuffer:
    """`nbytes` of anonymous, page-aligned memory: `view` to read and write it, `address` for C."""

    def __init__(self, nbytes: int) -> None:
        self.area = mmap.mmap(-1, max(nbytes, 1))
        self.view = memoryview(self.area)
        self.address = address_of(self.area)

    def close(self) -> None:
        try:
            self.view.release()
            self.area.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass
