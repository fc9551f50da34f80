"""Opening checkpoint files: headers eagerly, tensor bytes only when asked.

`.safetensors` files are read with positioned reads straight into the caller's buffer, so no
model is ever held in memory and nothing is memory-mapped (mapped pages would count towards
the merge's RSS). Pickled `.ckpt`/`.pt` files go through torch's weights-only unpickler, which
refuses anything but tensors and plain containers: a pickle that wants to run code is rejected,
never executed.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:  # planning reads headers only and must not pay for importing torch
    import torch

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
MAX_HEADER_BYTES = 100 << 20
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }


def torch_dtype(name: str) -> torch.dtype:
    return torch_dtypes()[name]


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int = 0  # absolute byte offset in the file (safetensors only)
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


class Checkpoint:
    """One open checkpoint file. `tensors` is known up front; bytes are read on demand.

    Safetensors data is read through a read-only mapping of the file, so a chunk is widened
    straight out of the page cache without a copy. Mapped pages count towards the process's
    RSS, so the executor calls `release()` every so often to unmap what it has read.
    """

    def __init__(self, path: Path, name: str, fmt: str, tensors: dict[str, TensorInfo],
                 metadata: dict[str, str], header_size: int, loaded: dict[str, torch.Tensor] | None):
        stat = path.stat()
        self.path = path
        self.name = name
        self.format = fmt
        self.size = stat.st_size
        self.mtime_ns = stat.st_mtime_ns
        self.tensors = tensors
        self.metadata = metadata
        self.header_size = header_size  # 8 + JSON length for safetensors, 0 for pickles
        self._loaded = loaded
        self._fd = os.open(path, os.O_RDONLY) if loaded is None else None
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None
        self._lock = threading.Lock()

    def read_into(self, key: str, start: int, stop: int, staging: torch.Tensor) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor: a view of the mapped file, or of
        `staging` (uint8) where the tensor's bytes are not aligned for a typed view."""
        info = self.tensors[key]
        if self._loaded is not None:
            return self._loaded[key].reshape(-1)[start:stop]
        size = ITEMSIZE[info.dtype]
        offset, nbytes = info.start + start * size, (stop - start) * size
        if offset % size == 0 and nbytes:
            return self._mapped()[offset:offset + nbytes].view(torch_dtype(info.dtype))
        return self.pread_into(key, start, stop, staging)

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
        view = memoryview(staging.numpy())[:nbytes]
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError("file ended early (truncated or changed while reading)",
                                      model=self.name, key=key)
            done += got
        return staging[:nbytes].view(torch_dtype(info.dtype))

    def release(self) -> None:
        """Unmap every page read so far; later reads map them again from the page cache."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED, 0, self.size)

    def _mapped(self) -> torch.Tensor:
        with self._lock:
            if self._bytes is None:
                import torch

                self._map = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ)
                with warnings.catch_warnings():  # read-only on purpose: nothing writes through it
                    warnings.simplefilter("ignore", UserWarning)
                    self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
            return self._bytes

    def read_tensor(self, key: str) -> torch.Tensor:
        """A whole tensor, copied into memory (for small tensors and inspection)."""
        info = self.tensors[key]
        if self._loaded is not None:
            return self._loaded[key].clone()
        import torch

        staging = torch.empty(max(info.nbytes, 1), dtype=torch.uint8)
        return self.read_into(key, 0, info.numel, staging).clone().reshape(info.shape)

    def close(self) -> None:
        self._bytes = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike[str], *, name: str | None = None) -> Checkpoint:
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise CheckpointError("no such checkpoint file", model=name, details={"path": str(path)})
    with open(path, "rb") as f:
        magic = f.read(8)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _open_safetensors(path, name)
    if path.suffix.lower() in PICKLE_SUFFIXES or magic[:2] == b"PK" or magic[:1] == b"\x80":
        return _open_pickle(path, name)
    raise CheckpointError(
        "not a checkpoint: expected .safetensors, .ckpt, .pt or .pth", model=name,
    )


def read_safetensors_header(path: Path, name: str) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the offset where tensor data begins; checks only the framing."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError("file too short to be safetensors (truncated?)", model=name)
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise CheckpointError(
                f"header length {length} is larger than the file ({size} bytes): truncated or not safetensors",
                model=name,
            )
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"header of {length} bytes is implausibly large", model=name)
        text = f.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"header is not valid JSON: {exc}", model=name) from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object", model=name)
    return header, 8 + length


def _open_safetensors(path: Path, name: str) -> Checkpoint:
    stat = path.stat()
    tensors, metadata, data_start = _parse_safetensors(path, name, stat.st_size, stat.st_mtime_ns)
    return Checkpoint(path, name, "safetensors", tensors, metadata, data_start, None)


@functools.lru_cache(maxsize=64)
def _parse_safetensors(path: Path, name: str, size: int, mtime_ns: int) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parsed and checked once per file version: the service plans the same files again and again.
    The returned mappings are shared; nothing may modify them."""
    header, data_start = read_safetensors_header(path, name)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError("__metadata__ must map strings to strings", model=name)
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        tensors[key] = _tensor_entry(entry, key, name, data_start, size)
    spans = sorted((t.start, t.end, k) for k, t in tensors.items() if t.end > t.start)
    for (_, prev_end, prev_key), (start, _, key) in zip(spans, spans[1:], strict=False):
        if start < prev_end:
            raise CheckpointError(f"tensor data overlaps that of {prev_key!r}: the header lies",
                                  model=name, key=key)
    return tensors, metadata, data_start


def _tensor_entry(entry: Any, key: str, name: str, data_start: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError("header entry is not an object", model=name, key=key)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"unsupported dtype {dtype!r}", model=name, key=key)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"bad shape {shape!r}", model=name, key=key)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"bad data_offsets {offsets!r}", model=name, key=key)
    info = TensorInfo(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    if info.end - info.start != info.nbytes:
        raise CheckpointError(
            f"data_offsets span {info.end - info.start} bytes but {dtype}{list(shape)} needs {info.nbytes}: the header lies",
            model=name, key=key,
        )
    if info.end > size:
        raise CheckpointError(
            f"tensor data ends at byte {info.end} but the file has {size}: truncated",
            model=name, key=key,
        )
    return info


def _open_pickle(path: Path, name: str) -> Checkpoint:
    import torch

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
    names = {dtype: name for name, dtype in torch_dtypes().items()}
    tensors = {}
    for key, tensor in loaded.items():
        if tensor.dtype not in names:
            raise CheckpointError(f"unsupported dtype {tensor.dtype}", model=name, key=key)
        tensors[key] = TensorInfo(names[tensor.dtype], tuple(tensor.shape))
    return Checkpoint(path, name, "pickle", tensors, {}, 0, loaded)
