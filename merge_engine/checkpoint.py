"""Opening checkpoint files: headers eagerly (header.py checks every claim), tensor bytes only
when asked, so no model is ever held in memory.

Pickled `.ckpt`/`.pt` files go through torch's weights-only unpickler, which refuses anything
but tensors and plain containers: a pickle that wants to run code is rejected, never executed.
"""

from __future__ import annotations

import functools
import mmap
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, Any

from . import header as _header
from .buffers import HostBuffer
from .errors import CheckpointError, InputChangedError
from .header import FLOAT_DTYPES, ITEMSIZE, MAX_HEADER_BYTES, TensorInfo

if TYPE_CHECKING:  # planning reads headers only and must not pay for importing torch
    import torch

__all__ = ["FLOAT_DTYPES", "ITEMSIZE", "MAX_HEADER_BYTES", "Checkpoint", "FileVersion", "TensorInfo",
           "open_checkpoint", "torch_dtype"]
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HEADER_CACHE_TENSORS = 1 << 17  # parsed headers kept per process, counted in tensors (~50 SDXL files)


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }


def torch_dtype(name: str) -> torch.dtype:
    return torch_dtypes()[name]


@dataclass(frozen=True)
class FileVersion:
    """Which file, in which state: what the kernel changes on every write, truncate or replace.
    The change time cannot be set back by a user (unlike mtime, `touch -d`), so a file whose
    version is the same was not written to in between."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> FileVersion:
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)

    def differences(self, other: FileVersion) -> list[str]:
        names = {"device": "device", "inode": "inode (replaced)", "size": "size", "mtime_ns": "modification time",
                 "ctime_ns": "change time"}
        return [label for name, label in names.items() if getattr(self, name) != getattr(other, name)]


class Checkpoint:
    """One open checkpoint file. `tensors` is known up front; bytes are read on demand.

    Safetensors data is read through a read-only mapping of the file, so a chunk is widened
    straight out of the page cache without a copy. Mapped pages count towards the process's
    RSS, so the executor calls `release()` every so often to unmap what it has read. A mapping is
    used only where the native guard can catch the SIGBUS of a file that shrinks under it; readers
    call `check_intact()` after reading, which turns such a fault into a clear error. Without the
    guard every read is a positioned read.

    The header, the data and `version` all come from one open file descriptor, so a file renamed
    over the path meanwhile changes nothing here; `check_unchanged()` says whether the file was
    written to since it was opened.
    """

    def __init__(self, path: Path, name: str, fmt: str, fd: int | None, version: FileVersion,
                 tensors: dict[str, TensorInfo], metadata: dict[str, str], header_size: int,
                 loaded: dict[str, torch.Tensor] | None, guard_slot: int = -1):
        self.path = path
        self.name = name
        self.format = fmt
        self.version = version
        self.size = version.size
        self.mtime_ns = version.mtime_ns
        self.tensors = tensors
        self.metadata = metadata
        self.header_size = header_size  # 8 + JSON length for safetensors, 0 for pickles
        self._loaded = loaded
        self._fd = fd
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None
        self._address: int | None = None  # of the mapping, once made and guarded
        self._guard = guard_slot  # the pickle's own mapping (torch's), or ours once made
        self._lock = threading.Lock()

    def read_into(self, key: str, start: int, stop: int, staging: torch.Tensor) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor: a view of the mapped file, or of
        `staging` (uint8) where the tensor's bytes are not aligned for a typed view or the file
        cannot be mapped safely. Call `check_intact()` once done with the view."""
        info = self.tensors[key]
        if self._loaded is not None:
            return self._loaded[key].reshape(-1)[start:stop]
        size = ITEMSIZE[info.dtype]
        offset, nbytes = info.start + start * size, (stop - start) * size
        if offset % size == 0 and nbytes and (mapped := self._mapped()) is not None:
            return mapped[offset:offset + nbytes].view(torch_dtype(info.dtype))
        return self.pread_into(key, start, stop, staging)

    def address_of(self, key: str, start: int, stop: int, staging: HostBuffer) -> int:
        """Where elements [start, stop) of a safetensors tensor are, for a native kernel: in the
        mapped file, or read into `staging` where they are not aligned or the file cannot be mapped
        safely. The torch-free `read_into`; call `check_intact()` once done with them."""
        info = self.tensors[key]
        if self._loaded is not None:  # torch has loaded the pickle (contiguous tensors)
            return self._loaded[key].reshape(-1)[start:stop].data_ptr()
        size = ITEMSIZE[info.dtype]
        offset, nbytes = info.start + start * size, (stop - start) * size
        if offset % size == 0 and nbytes and (address := self._map_address()) is not None:
            return address + offset
        self._pread(key, offset, staging.view[:nbytes])
        return staging.address

    def pread_into(self, key: str, start: int, stop: int, staging: torch.Tensor) -> torch.Tensor:
        """Elements [start, stop) read with positioned reads into `staging` (uint8; pinned memory
        for a fast copy to a GPU). No mapping: big reads beat page faults where faults are dear."""
        info = self.tensors[key]
        size = ITEMSIZE[info.dtype]
        offset, nbytes = info.start + start * size, (stop - start) * size
        if self._loaded is not None:
            out = staging[:nbytes].view(torch_dtype(info.dtype))
            out.copy_(self._loaded[key].reshape(-1)[start:stop])
            return out
        self._pread(key, offset, memoryview(staging.numpy())[:nbytes])
        return staging[:nbytes].view(torch_dtype(info.dtype))

    def read_bytes(self, key: str) -> bytes:
        """A whole tensor's bytes, as the file stores them (little-endian, row-major)."""
        info = self.tensors[key]
        if self._loaded is not None:
            return self._loaded[key].reshape(-1).view(-1).numpy().tobytes() if info.nbytes else b""
        data = bytearray(info.nbytes)
        self._pread(key, info.start, memoryview(data))
        self.check_intact(key)
        return bytes(data)

    def _pread(self, key: str, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise self._shrunk(key)
            done += got

    def fileno(self) -> int | None:
        """The descriptor every byte is read through (None for a pickle, which torch has loaded)."""
        return self._fd

    def check_intact(self, key: str | None = None) -> None:
        """Raise if a read through the mapping found the file shorter than its header says (the
        guard then read zeros in its place)."""
        if self._guard >= 0 and _guard().guard_faulted(self._guard):
            raise self._shrunk(key)

    def check_unchanged(self) -> None:
        """Raise `InputChangedError` if the file was written, truncated or replaced since it was
        opened: whatever was read from it may not be what its hashes describe."""
        self.check_intact()
        try:  # the open file itself: a new file renamed over the path changes nothing read here
            now = FileVersion.of(os.fstat(self._fd) if self._fd is not None else os.stat(self.path))
        except OSError:
            now = None
        if now != self.version:
            changed = "it was removed" if now is None else ", ".join(self.version.differences(now))
            raise InputChangedError(f"the file changed while it was being read ({changed}); "
                                    "its recorded hashes may not match what was read",
                                    model=self.name, details={"path": str(self.path)})

    def release(self) -> None:
        """Unmap every page read so far; later reads map them again from the page cache."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED, 0, self.size)

    def _map_address(self) -> int | None:
        """The address of the whole file mapped read-only, guarded; None where it cannot be."""
        with self._lock:
            if self._address is None and self._map is None and self.size and self._loaded is None:
                if _guard() is None:
                    return None
                try:  # the size the header was checked against: never a shorter file's
                    self._map = mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ)
                except ValueError:  # "mmap length is greater than file size": it shrank already
                    raise self._shrunk(None) from None
                address = _guard().address(self._map)
                self._guard = _guard().guard_map(address, self.size)
                if self._guard >= 0:  # else no slot left: positioned reads are as correct, only slower
                    self._address = address
            return self._address

    def _mapped(self) -> torch.Tensor | None:
        """The mapping as a torch uint8 tensor (for the torch paths)."""
        if self._map_address() is None:
            return None
        with self._lock:
            if self._bytes is None:
                import torch

                with warnings.catch_warnings():  # read-only on purpose: nothing writes through it
                    warnings.simplefilter("ignore", UserWarning)
                    self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
            return self._bytes

    def _shrunk(self, key: str | None) -> CheckpointError:
        return CheckpointError("the file ended early: it was truncated or changed while being read",
                               model=self.name, key=key, details={"path": str(self.path)})

    def read_tensor(self, key: str) -> torch.Tensor:
        """A whole tensor, copied into memory (for small tensors and inspection)."""
        info = self.tensors[key]
        if self._loaded is not None:
            tensor = self._loaded[key].clone()
        else:
            import torch

            staging = torch.empty(max(info.nbytes, 1), dtype=torch.uint8)
            tensor = self.read_into(key, 0, info.numel, staging).clone().reshape(info.shape)
        self.check_intact(key)
        return tensor

    def close(self) -> None:
        self._bytes = None
        self._address = None
        if self._guard >= 0 and self._loaded is None:
            _guard().guard_release(self._guard)
            self._guard = -1
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._loaded is not None:
            self._loaded = None
            if self._guard >= 0:  # torch's mapping goes with the tensors
                _guard().guard_release(self._guard)
                self._guard = -1

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


@functools.cache
def _guard() -> Any:
    """The native module that guards mappings (merge_engine/_kernels.c), or None without it."""
    try:
        from . import _kernels
    except ImportError:  # built without a C compiler: every read is a positioned read
        return None
    return _kernels if hasattr(_kernels, "guard_map") and hasattr(_kernels, "address") else None


def open_checkpoint(path: str | os.PathLike[str], *, name: str | None = None) -> Checkpoint:
    path = Path(path)
    name = name or path.name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)  # a FIFO must not hang us
    except FileNotFoundError:
        raise CheckpointError("no such checkpoint file", model=name, details={"path": str(path)}) from None
    except (OSError, ValueError) as exc:  # permissions, a NUL in the path, a symlink loop
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointError(f"cannot open the file: {reason}", model=name, details={"path": str(path)}) from None
    try:
        stat = os.fstat(fd)
        if not S_ISREG(stat.st_mode):
            raise CheckpointError("not a regular file", model=name, details={"path": str(path)})
        os.set_blocking(fd, True)
        version = FileVersion.of(stat)
        magic = os.pread(fd, 8, 0)
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            return _open_safetensors(path, name, fd, version)
        if path.suffix.lower() in PICKLE_SUFFIXES or magic[:2] == b"PK" or magic[:1] == b"\x80":
            os.close(fd)
            fd = None
            return _open_pickle(path, name)
        raise CheckpointError("not a checkpoint: expected .safetensors, .ckpt, .pt or .pth", model=name)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def read_safetensors_header(path: Path, name: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensors, metadata, data start) of a safetensors file, every claim of its header checked."""
    with open(path, "rb") as f:
        found = _header.read_header(f, os.fstat(f.fileno()).st_size, name)
    return found.tensors, found.metadata, found.data_start


def _open_safetensors(path: Path, name: str, fd: int, version: FileVersion) -> Checkpoint:
    parsed = _HEADERS.get(version)
    if parsed is None:
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            parsed = _header.read_header(f, version.size, name)
        _HEADERS.put(version, parsed)
    return Checkpoint(path, name, "safetensors", fd, version, parsed.tensors, parsed.metadata,
                      parsed.data_start, None)


class _HeaderCache:
    """Parsed headers by file version: the service plans the same files again and again. Bounded
    by the tensors it holds, so no header bomb and no deleted model stays in a long-lived process.
    The cached mappings are shared; nothing may modify them."""

    def __init__(self, budget: int) -> None:
        self.budget, self.held = budget, 0
        self.entries: OrderedDict[FileVersion, _header.Header] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, version: FileVersion) -> _header.Header | None:
        with self.lock:
            found = self.entries.get(version)
            if found is not None:
                self.entries.move_to_end(version)
            return found

    def put(self, version: FileVersion, parsed: _header.Header) -> None:
        weight = len(parsed.tensors) + 1
        if weight > self.budget:
            return
        with self.lock:
            if version in self.entries:
                return
            self.entries[version] = parsed
            self.held += weight
            while self.held > self.budget:
                _, dropped = self.entries.popitem(last=False)
                self.held -= len(dropped.tensors) + 1

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.held = 0


_HEADERS = _HeaderCache(HEADER_CACHE_TENSORS)


def _open_pickle(path: Path, name: str) -> Checkpoint:
    import torch

    version = FileVersion.of(os.stat(path))
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) pickles cannot be mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unpickling failure is the file's fault
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text:
            hint = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
            raise CheckpointError(
                "refused: this pickle wants to load or run code, not just tensors; it was not executed"
                + (f" ({hint})" if hint else ""),
                model=name,
            ) from None
        raise CheckpointError(f"cannot read pickle: {text.splitlines()[0] if text else type(exc).__name__}",
                              model=name) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError("pickle holds no state dict", model=name)
    loaded = {k: v.contiguous() for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not loaded:
        raise CheckpointError("pickle holds no tensors", model=name)
    if len(loaded) > _header.MAX_TENSORS:
        raise CheckpointError(f"the pickle holds more than {_header.MAX_TENSORS} tensors", model=name)
    names = {dtype: name for name, dtype in torch_dtypes().items()}
    tensors = {}
    for key, tensor in loaded.items():
        if tensor.dtype not in names:
            raise CheckpointError(f"unsupported dtype {tensor.dtype}", model=name, key=key)
        tensors[key] = TensorInfo(names[tensor.dtype], tuple(tensor.shape))
    return Checkpoint(path, name, "pickle", None, version, tensors, {}, 0, loaded, _guard_storages(loaded))


def _guard_storages(loaded: dict[str, torch.Tensor]) -> int:
    """torch maps a zip checkpoint whole and its tensors are views into that mapping: guard the
    span they cover, so a file truncated under them is an error, not a SIGBUS."""
    guard = _guard()
    spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in loaded.values()
             if t.untyped_storage().nbytes()]
    if guard is None or not spans:
        return -1
    low = min(start for start, _ in spans)
    high = max(start + length for start, length in spans)
    return guard.guard_map(low, high - low)
