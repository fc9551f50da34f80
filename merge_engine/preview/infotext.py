"""Generation parameters in the WebUI's `parameters` PNG text chunk, and a small PNG codec.

The infotext format is what the A1111 WebUI writes and reads back ("PNG Info"), so an image
made here can be reproduced there:

    PROMPT
    Negative prompt: NEGATIVE
    Steps: 4, Sampler: Euler, CFG scale: 7, Seed: 7, Size: 64x64, Model hash: 1234567890, Model: NAME

The negative line is left out when it is empty; a value holding a comma, colon or newline is
written as a JSON string. The PNG side is standard library only (zlib), because the engine
does not depend on Pillow: a text chunk is `tEXt` when Latin-1 can hold it and an uncompressed
UTF-8 `iTXt` otherwise, which is what Pillow (and so the WebUI) writes.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

PARAMETERS_KEY = "parameters"
_NEGATIVE = "Negative prompt:"
# One "Key: value" pair of the last line; a value is a JSON string or runs up to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel (8-bit only)


def _text(value: Any) -> str:
    """Numbers as the WebUI shows them: 7.0 as "7", 7.5 as "7.5"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quote(value: str) -> str:
    if any(char in value for char in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def format_parameters(prompt: str, negative_prompt: str, parameters: dict[str, Any]) -> str:
    """Infotext from a prompt, a negative prompt and ordered "Key": value parameters."""
    line = ", ".join(
        key if key == value else f"{key}: {_quote(_text(value))}"
        for key, value in parameters.items() if value is not None
    )
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def format_infotext(prompt: str, negative_prompt: str, steps: int, sampler: str, cfg_scale: float,
                    seed: int, width: int, height: int, model_hash: str, model_name: str,
                    **extra: Any) -> str:
    """The WebUI's infotext; `extra` keyword arguments follow as "Key: value" (underscores
    become spaces, so `clip_skip=2` is written "Clip skip: 2")."""
    parameters: dict[str, Any] = {
        "Steps": steps, "Sampler": sampler, "CFG scale": cfg_scale, "Seed": seed,
        "Size": f"{width}x{height}", "Model hash": model_hash, "Model": model_name,
    }
    for key, value in extra.items():
        parameters[key.replace("_", " ").capitalize() if key.islower() else key] = value
    return format_parameters(prompt, negative_prompt, parameters)


def parse_infotext(text: str) -> dict[str, str]:
    """Infotext -> {"Prompt", "Negative prompt", then each parameter}, values as strings."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        # Not a parameter line after all (a hand-written prompt): it belongs to the prompt.
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            negative.append(line[len(_NEGATIVE):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        result[key] = _unquote(value)
    return result


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text_chunk(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # iTXt: keyword, no compression, empty language tag and translated keyword, UTF-8 text.
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def _pixels(image: Any) -> tuple[int, int, int, bytes]:
    """(width, height, colour type, raw bytes) of a PIL image or a uint8 HxW[xC] array."""
    import numpy as np

    if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image, without importing PIL
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"a preview image must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"a preview image must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[array.shape[2]]
    height, width = array.shape[:2]
    return width, height, colour_type, np.ascontiguousarray(array).tobytes()


def write_png(path: str | Path, image: Any, infotext: str | None = None, *,
              text: dict[str, str] | None = None) -> Path:
    """Write an 8-bit PNG with the infotext in its `parameters` chunk (and any other `text`)."""
    width, height, colour_type, data = _pixels(image)
    stride = width * _CHANNELS[colour_type]
    # Filter type 0 on every row: simple, and zlib does the real work on previews.
    raw = b"".join(b"\0" + data[row * stride:(row + 1) * stride] for row in range(height))
    chunks = {**({PARAMETERS_KEY: infotext} if infotext is not None else {}), **(text or {})}
    path = Path(path)
    path.write_bytes(
        _PNG_SIGNATURE
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
        + b"".join(_text_chunk(key, value) for key, value in chunks.items())
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )
    return path


def _read_chunks(path: str | Path) -> list[tuple[bytes, bytes]]:
    data = Path(path).read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"{path} is not a PNG file")
    chunks, offset = [], len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])[0]:
            raise ValueError(f"{path}: bad CRC in its {kind.decode('latin-1')} chunk")
        chunks.append((kind, body))
        offset += 12 + length
        if kind == b"IEND":
            break
    return chunks


def read_png_text(path: str | Path) -> dict[str, str]:
    """Every tEXt, zTXt and iTXt entry of a PNG file."""
    text: dict[str, str] = {}
    for kind, body in _read_chunks(path):
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"zTXt":
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = zlib.decompress(value[1:]).decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            _language, _, rest = rest.partition(b"\0")
            _translated, _, value = rest.partition(b"\0")
            text[key.decode("latin-1")] = (zlib.decompress(value) if compressed else value).decode("utf-8")
    return text


def read_png_parameters(path: str | Path) -> str | None:
    """The infotext of a PNG file, or None when it has none."""
    return read_png_text(path).get(PARAMETERS_KEY)


def read_png_pixels(path: str | Path) -> Any:
    """The pixels of an 8-bit, non-interlaced PNG as a uint8 HxWxC array (for checks and tests)."""
    import numpy as np

    chunks = _read_chunks(path)
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if depth != 8 or interlace or colour_type not in _CHANNELS:
        raise ValueError(f"{path}: only 8-bit non-interlaced grey/RGB/RGBA PNGs are read")
    channels = _CHANNELS[colour_type]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width * channels
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.int32)
    for y in range(height):
        _unfilter(rows[y, 0], rows[y, 1:].astype(np.int32), out, y, channels)
    return out.astype(np.uint8).reshape(height, width, channels)


def _unfilter(kind: int, line: Any, out: Any, y: int, bpp: int) -> None:
    """Undo one row's PNG filter (types 0-4) into out[y]."""
    above = out[y - 1] if y else out[y] * 0
    if kind == 0:
        out[y] = line
    elif kind == 2:
        out[y] = (line + above) & 0xFF
    elif kind in (1, 3, 4):
        row = out[y]
        for x in range(len(line)):
            left = row[x - bpp] if x >= bpp else 0
            up, corner = above[x], (above[x - bpp] if x >= bpp else 0)
            if kind == 1:
                predicted = left
            elif kind == 3:
                predicted = (left + up) // 2
            else:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                predicted = left if pa <= pb and pa <= pc else up if pb <= pc else corner
            row[x] = (line[x] + predicted) & 0xFF
    else:
        raise ValueError(f"unknown PNG filter type {kind}")
