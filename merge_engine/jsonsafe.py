"""JSON from files and requests, read so that no input can crash what reads it.

`json.loads` raises `RecursionError` on JSON nested thousands deep and `ValueError` on an integer
of more than 4,300 digits, and what it returns can still be nested deeply enough to crash the
next recursive reader (pydantic, `json.dumps`, our recipe walkers, an ORM's JSON column). So
every JSON text from outside is read here: errors become the caller's domain error, and the
nesting depth is capped at `MAX_DEPTH` levels — pydantic's own JSON parser stops at 200 too.
JSON files are read with `read_file`, which refuses what is not a regular file and reads a bounded
number of bytes.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import SdmergeError

MAX_DEPTH = 200


def read_file(path: Path, what: str, limit: int, error: type[SdmergeError], *, prefix: bool = False) -> bytes:
    """A regular file's bytes (with `prefix`, its first `limit` bytes; else a longer file is an
    error): a FIFO, a device or a folder is refused, not read (a FIFO with no writer would wait
    forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise error(f"cannot read {what} {path}: it does not exist") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO or device?)"
            raise error(f"cannot read {what} {path}: it is {kind}")
        if info.st_size > limit and not prefix:
            raise error(f"cannot read {what} {path}: it has {info.st_size:,} bytes, more than {limit:,}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def loads(text: str | bytes, *, what: str, error: type[SdmergeError], model: str | None = None,
          max_depth: int = MAX_DEPTH) -> Any:
    """`text` decoded, or `error` saying why not (`what` names the text in the message)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{what} is nested too deeply (at most {max_depth} levels)", model=model) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a number of thousands of digits
        raise error(f"{what} is not valid JSON: {str(exc).splitlines()[0][:200]}", model=model) from None
    check_depth(value, what=what, error=error, model=model, max_depth=max_depth)
    return value


def check_depth(value: Any, *, what: str, error: type[SdmergeError], model: str | None = None,
                max_depth: int = MAX_DEPTH) -> None:
    """Raise `error` if `value` (decoded JSON) nests containers more than `max_depth` deep."""
    deepest = depth(value, stop_at=max_depth + 1)
    if deepest > max_depth:
        raise error(f"{what} is nested more than {max_depth} levels deep", model=model,
                    details={"max_depth": max_depth})


def depth(value: Any, *, stop_at: int | None = None) -> int:
    """How many containers deep `value` nests (a scalar is 0), without recursion; counting stops
    once `stop_at` is reached."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if stop_at is not None and deepest >= stop_at:
            return deepest
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list | tuple))
    return deepest


def try_loads(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """`text` decoded if it is JSON no deeper than `max_depth`, else None (for optional fields)."""
    try:
        value = json.loads(text)
    except (RecursionError, ValueError, TypeError):
        return None
    return value if depth(value, stop_at=max_depth + 1) <= max_depth else None
