"""Reading a safetensors header strictly, in bounded time and memory, whoever wrote the file.

The format (https://github.com/huggingface/safetensors#format): 8 bytes of little-endian header
length, then that many bytes of UTF-8 JSON — an object mapping each tensor name to
`{"dtype", "shape", "data_offsets"}`, plus an optional `__metadata__` mapping strings to strings —
padded with spaces, then the data, every byte of it indexed by exactly one tensor (no holes, no
overlaps, nothing after the last tensor). The format forbids what a lenient `json.loads` takes:
UTF-16/32 text, a byte-order mark, duplicate names, and `true` where a number is due.

A hostile header can be 100 MB of JSON: 1.6 M empty tensors, a 47 M-long shape, JSON nested
20,000 deep, a 5,000-digit number. So the header is not handed to `json.loads` whole: tensor
entries are read one at a time, each from a slice of at most `MAX_ENTRY_CHARS`, and the count of
tensors and the rank of shapes are capped before anything else is built. Every problem is a
`CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Any, BinaryIO

from .errors import CheckpointError

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
MAX_TENSORS = 1 << 16  # a full SDXL checkpoint with EMA holds about 5,000
MAX_RANK = 8  # convolution weights have 4 dimensions, 3D ones 5
MAX_NAME_CHARS = 1024
MAX_ENTRY_CHARS = 1024  # `{"dtype":...,"shape":[8 dims],"data_offsets":[...]}` needs under 300
ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


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


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # 8 + the JSON's length


def read_header(f: BinaryIO, size: int, name: str) -> Header:
    """The checked header of the open safetensors file `f` of `size` bytes."""
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
        raise CheckpointError(f"header of {length} bytes is larger than the format allows ({MAX_HEADER_BYTES})",
                              model=name)
    text = f.read(length)
    if len(text) != length:
        raise CheckpointError("file ended inside its header (truncated or changed while reading)", model=name)
    return parse_header(text, size, name)


def parse_header(raw: bytes, size: int, name: str) -> Header:
    """`raw` is the JSON after the 8-byte length; `size` the whole file's."""
    try:
        text = raw.decode("utf-8")  # strict: no UTF-16/32, which json.loads would sniff and accept
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"header is not UTF-8 (byte {exc.start}): not a safetensors file", model=name) from None
    if "\x00" in text:  # valid UTF-8, but JSON allows no raw NUL: UTF-16/32 text read as bytes
        raise CheckpointError("header holds NUL bytes: UTF-16 or UTF-32 text, not the UTF-8 the format requires",
                              model=name)
    if not text.startswith("{"):
        what = "a byte-order mark" if text.startswith("\ufeff") else repr(text[:1])
        raise CheckpointError(f"header must begin with '{{', not {what}", model=name)
    entries, metadata = _entries(text, name)
    data_start = 8 + len(raw)
    tensors = {key: _tensor(entry, key, name, data_start) for key, entry in entries.items()}
    _check_layout(tensors, data_start, size, name)
    return Header(tensors, metadata, data_start)


def _entries(text: str, name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The top-level object, one member at a time, so no member is ever bigger than allowed."""
    entries: dict[str, Any] = {}
    metadata: dict[str, str] | None = None
    pos = _skip(text, 1)
    if text[pos:pos + 1] == "}":
        return entries, {}
    while True:
        if text[pos:pos + 1] != '"':
            raise _syntax(name, pos, "a tensor name in double quotes")
        try:
            key, pos = scanstring(text, pos + 1, True)
        except json.JSONDecodeError as exc:
            raise _syntax(name, exc.pos, "a valid string") from None
        if len(key) > MAX_NAME_CHARS:
            raise CheckpointError(f"a tensor name of {len(key)} characters is longer than {MAX_NAME_CHARS}",
                                  model=name, key=key[:80] + "…")
        if key in entries or (key == "__metadata__" and metadata is not None):
            raise CheckpointError("the header names this tensor twice", model=name, key=key)
        pos = _skip(text, pos)
        if text[pos:pos + 1] != ":":
            raise _syntax(name, pos, "':'")
        pos = _skip(text, pos + 1)
        if key == "__metadata__":
            metadata, pos = _metadata(text, pos, name)
        else:
            if len(entries) >= MAX_TENSORS:
                raise CheckpointError(f"the header lists more than {MAX_TENSORS} tensors", model=name)
            entries[key], pos = _entry(text, pos, name, key)
        pos = _skip(text, pos)
        if text[pos:pos + 1] == ",":
            pos = _skip(text, pos + 1)
            continue
        if text[pos:pos + 1] == "}":
            break
        raise _syntax(name, pos, "',' or '}'")
    if text[pos + 1:].strip(" "):
        raise CheckpointError("the header has bytes after its JSON object (only space padding is allowed)",
                              model=name)
    return entries, metadata or {}


def _entry(text: str, pos: int, name: str, key: str) -> tuple[Any, int]:
    """One tensor's entry, parsed from a bounded slice: a 47 M-long shape is refused unread."""
    piece = text[pos:pos + MAX_ENTRY_CHARS]
    try:
        value, end = _DECODER.raw_decode(piece)
    except (json.JSONDecodeError, RecursionError, ValueError):
        long = len(piece) == MAX_ENTRY_CHARS
        raise CheckpointError(
            f"tensor entry is longer than {MAX_ENTRY_CHARS} characters" if long else "tensor entry is not valid JSON",
            model=name, key=key) from None
    return value, pos + end


def _metadata(text: str, pos: int, name: str) -> tuple[dict[str, str], int]:
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        raise _syntax(name, exc.pos, "a valid __metadata__ object") from None
    except (RecursionError, ValueError) as exc:  # nesting, or a number of thousands of digits
        raise CheckpointError(f"__metadata__ cannot be read: {_reason(exc)}", model=name) from None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CheckpointError("__metadata__ must map strings to strings", model=name)
    return value, end


def _tensor(entry: Any, key: str, name: str, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError("header entry is not an object", model=name, key=key)
    if set(entry) != ENTRY_KEYS:
        missing, extra = sorted(ENTRY_KEYS - set(entry)), sorted(set(entry) - ENTRY_KEYS)
        raise CheckpointError(f"header entry must hold dtype, shape and data_offsets only "
                              f"(missing {missing}, unknown {extra})", model=name, key=key)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CheckpointError(f"unsupported dtype {dtype!r}", model=name, key=key)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"bad shape {_short(shape)}: dimensions are non-negative integers", model=name, key=key)
    if len(shape) > MAX_RANK:
        raise CheckpointError(f"shape has {len(shape)} dimensions; at most {MAX_RANK} are allowed",
                              model=name, key=key)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise CheckpointError(f"bad data_offsets {_short(offsets)}", model=name, key=key)
    info = TensorInfo(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    if info.end - info.start != info.nbytes:
        raise CheckpointError(
            f"data_offsets span {info.end - info.start} bytes but {dtype}{list(shape)} needs {info.nbytes}: the header lies",
            model=name, key=key,
        )
    return info


def _check_layout(tensors: dict[str, TensorInfo], data_start: int, size: int, name: str) -> None:
    """Every data byte belongs to exactly one tensor, in order: no overlap, hole or trailing bytes."""
    spans = sorted(((t.start, t.end, k) for k, t in tensors.items()))
    for _, end, key in spans:
        if end > size:
            raise CheckpointError(f"tensor data ends at byte {end} but the file has {size}: truncated",
                                  model=name, key=key)
    for (_, prev_end, prev_key), (start, _, key) in zip(spans, spans[1:], strict=False):
        if start < prev_end:
            raise CheckpointError(f"tensor data overlaps that of {prev_key!r}: the header lies", model=name, key=key)
    expected = data_start
    for start, end, key in spans:
        if start > expected:
            raise CheckpointError(f"{start - expected} bytes before this tensor's data belong to no tensor "
                                  "(the format allows no holes)", model=name, key=key)
        expected = end
    if expected != size:
        raise CheckpointError(f"{size - expected} bytes after the last tensor belong to no tensor "
                              "(the format allows none)", model=name)


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 63  # bool is an int to Python, not to the format


def _skip(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def _syntax(name: str, pos: int, expected: str) -> CheckpointError:
    return CheckpointError(f"header is not valid JSON: expected {expected} at character {pos}", model=name)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "its JSON is nested too deeply"
    return str(exc).split("\n")[0][:200]
