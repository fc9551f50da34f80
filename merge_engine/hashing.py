"""The hashes users recognise, computed in one read and remembered per file version.

* sha256 of the whole file: A1111's "new" hash (its first 10 hex digits are the "Model hash"
  in generation parameters) and Civitai's AutoV2.
* legacy: A1111's old 8-hex hash, sha256 of 64 KiB at offset 1 MiB (Civitai's AutoV1).
* autov3: sha256 of everything after the safetensors header, which survives metadata edits.

Hashing a 2-7 GB file takes seconds, so results are cached in a small SQLite file, like the
WebUI's hash cache, per file version (checkpoint.FileVersion). The cache is an optimisation
only: any failure to use it is ignored.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import FileVersion
from .errors import InputChangedError

CHUNK = 8 << 20
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000


@dataclass(frozen=True)
class FileHashes:
    sha256: str
    autov3: str | None
    legacy: str

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    def to_dict(self) -> dict[str, str | None]:
        return {"sha256": self.sha256, "shorthash": self.shorthash, "autov3": self.autov3,
                "legacy": self.legacy}


def cache_path() -> Path:
    if "SDMERGE_HASH_CACHE" in os.environ:
        return Path(os.environ["SDMERGE_HASH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdmerge" / "hashes.sqlite3"


def hash_file(path: str | os.PathLike[str], *, use_cache: bool = True) -> FileHashes:
    return hash_version(path, use_cache=use_cache)[0]


def hash_version(path: str | os.PathLike[str], *, use_cache: bool = True) -> tuple[FileHashes, FileVersion]:
    """The file's hashes and the version of the file they describe."""
    path = Path(path).resolve()
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_fd(fd, path, use_cache=use_cache)
    finally:
        os.close(fd)


def hash_fd(fd: int, path: Path, *, use_cache: bool = True) -> tuple[FileHashes, FileVersion]:
    """Hashes of the open file `fd` (at `path`, the cache's key with the file's version). The
    version is taken before and after reading: a file written to meanwhile is an error, never a
    hash that matches neither version."""
    version = FileVersion.of(os.fstat(fd))
    ident = (str(path), version.device, version.inode, version.size, version.mtime_ns, version.ctime_ns)
    if use_cache and (hit := _cache_get(ident)) is not None:
        return hit, version
    hashes = compute_hashes(fd, path.suffix.lower() == ".safetensors", version.size)
    after = FileVersion.of(os.fstat(fd))
    if after != version:
        raise InputChangedError(f"the file changed while it was being hashed ({', '.join(version.differences(after))})",
                                model=path.name, details={"path": str(path)})
    if use_cache:
        _cache_put(ident, hashes)
    return hashes, version


def compute_hashes(fd: int, safetensors: bool, size: int) -> FileHashes:
    full = hashlib.sha256()
    after_header = hashlib.sha256() if safetensors else None
    head = os.pread(fd, 8, 0)
    data_start = 8 + struct.unpack("<Q", head)[0] if after_header and len(head) == 8 else None
    pos = 0
    # hashlib drops the GIL on large buffers, so the two digests run on two cores.
    with ThreadPoolExecutor(1) as pool:
        while chunk := os.pread(fd, CHUNK, pos):
            pending = pool.submit(full.update, chunk)
            if after_header is not None and data_start is not None and pos + len(chunk) > data_start:
                after_header.update(memoryview(chunk)[max(0, data_start - pos):])
            pending.result()
            pos += len(chunk)
    if pos != size:
        raise InputChangedError(f"the file has {pos} bytes, not {size}: it changed while being hashed")
    legacy = hashlib.sha256(os.pread(fd, LEGACY_LENGTH, LEGACY_OFFSET)).hexdigest()[:8]
    return FileHashes(full.hexdigest(), after_header.hexdigest() if after_header else None, legacy)


# Keyed by the whole file version: size and mtime alone miss an in-place rewrite whose mtime
# was set back (`touch -d`, `rsync --times`); the change time and inode do not.
_KEY = "path, device, inode, size, mtime_ns, ctime_ns"


def sha256_fd(fd: int, size: int, should_stop: Callable[[], bool] = lambda: False) -> str | None:
    """sha256 of the open file's `size` bytes, read in order (None if stopped first)."""
    digest = hashlib.sha256()
    pos = 0
    while pos < size and not should_stop():
        chunk = os.pread(fd, min(CHUNK, size - pos), pos)
        if not chunk:
            break
        digest.update(chunk)
        pos += len(chunk)
    return None if should_stop() else digest.hexdigest()


def _connect() -> sqlite3.Connection:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=5)
    db.execute(f"CREATE TABLE IF NOT EXISTS file_hashes ({_KEY}, sha256 TEXT, autov3 TEXT, legacy TEXT,"
               f" PRIMARY KEY ({_KEY}))")
    return db


def _cache_get(ident: tuple) -> FileHashes | None:
    try:
        with _connect() as db:
            row = db.execute(
                "SELECT sha256, autov3, legacy FROM file_hashes WHERE path=? AND device=? AND inode=? AND size=?"
                " AND mtime_ns=? AND ctime_ns=?", ident,
            ).fetchone()
        return FileHashes(*row) if row else None
    except (sqlite3.Error, OSError):
        return None


def _cache_put(ident: tuple, hashes: FileHashes) -> None:
    try:
        with _connect() as db:
            db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (*ident, hashes.sha256, hashes.autov3, hashes.legacy))
    except (sqlite3.Error, OSError):
        pass
