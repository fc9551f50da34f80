"""The hashes users recognise, computed in one read and remembered per file version.

* sha256 of the whole file: A1111's "new" hash (its first 10 hex digits are the "Model hash"
  in generation parameters) and Civitai's AutoV2.
* legacy: A1111's old 8-hex hash, sha256 of 64 KiB at offset 1 MiB (Civitai's AutoV1).
* autov3: sha256 of everything after the safetensors header (the tensor data), which survives
  metadata edits; Civitai's AutoV3, and what ModelSpec's `modelspec.hash_sha256` records.
* crc32 (zlib's CRC-32) and blake3 of the whole file: the other two hashes Civitai lists.

Civitai shows them upper case and shortened: AutoV1 8 hex, AutoV2 10, AutoV3 12, CRC32 8,
SHA256 and BLAKE3 in full (`FileHashes.civitai`). Its search takes any of them.

All five digests come from one read of the file: each chunk is handed to the digests on worker
threads (hashlib, zlib and blake3 release the GIL on large buffers), so the cost is that of the
slowest digest, not their sum (bench/hash_bench.py).

Hashing a 2-7 GB file takes seconds, so results are cached in a small SQLite file, like the
WebUI's hash cache, per file version (checkpoint.FileVersion). The cache is an optimisation
only: any failure to use it is ignored.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from blake3 import blake3

from .checkpoint import FileVersion
from .errors import InputChangedError

CHUNK = 8 << 20
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000


@dataclass(frozen=True)
class FileHashes:
    """Lower-case hex digests; `civitai` gives the forms Civitai displays."""

    sha256: str
    autov3: str | None  # None for a file that is not .safetensors
    legacy: str
    crc32: str
    blake3: str

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    @property
    def civitai(self) -> dict[str, str]:
        return civitai_forms(self.sha256, self.legacy, self.autov3, self.crc32, self.blake3)

    def to_dict(self) -> dict[str, str | dict[str, str] | None]:
        return {"sha256": self.sha256, "shorthash": self.shorthash, "autov3": self.autov3,
                "legacy": self.legacy, "crc32": self.crc32, "blake3": self.blake3, "civitai": self.civitai}


def civitai_forms(sha256: str | None, legacy: str | None, autov3: str | None, crc32: str | None,
                  blake3: str | None) -> dict[str, str]:
    """The hashes as Civitai shows them (and its search takes them); an unknown one is left out."""
    shown = {"AutoV1": legacy, "AutoV2": sha256 and sha256[:10], "AutoV3": autov3 and autov3[:12],
             "SHA256": sha256, "CRC32": crc32, "BLAKE3": blake3}
    return {kind: value.upper() for kind, value in shown.items() if value}


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


class _Crc32:
    """zlib.crc32 as a digest object (Civitai's CRC32: 8 hex digits)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def compute_hashes(fd: int, safetensors: bool, size: int) -> FileHashes:
    full, crc, b3 = hashlib.sha256(), _Crc32(), blake3()
    after_header = hashlib.sha256() if safetensors else None
    head = os.pread(fd, 8, 0)
    data_start = 8 + struct.unpack("<Q", head)[0] if after_header and len(head) == 8 else None
    pos = 0
    # One read, every digest: the whole-file digests run on the pool while this thread does the
    # data-section sha256; each digest sees its chunks in order (one update per digest at a time).
    with ThreadPoolExecutor(3) as pool:
        while chunk := os.pread(fd, CHUNK, pos):
            pending = [pool.submit(digest.update, chunk) for digest in (full, b3, crc)]
            if after_header is not None and data_start is not None and pos + len(chunk) > data_start:
                after_header.update(memoryview(chunk)[max(0, data_start - pos):])
            for done in pending:
                done.result()
            pos += len(chunk)
    if pos != size:
        raise InputChangedError(f"the file has {pos} bytes, not {size}: it changed while being hashed")
    legacy = hashlib.sha256(os.pread(fd, LEGACY_LENGTH, LEGACY_OFFSET)).hexdigest()[:8]
    return FileHashes(full.hexdigest(), after_header.hexdigest() if after_header else None, legacy,
                      crc.hexdigest(), b3.hexdigest())


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


# Rows of the first table (`file_hashes`, before CRC32 and BLAKE3) are never read: a file
# hashed by an older version is hashed again once, and its row lands here with every field.
_TABLE = "file_hashes_v2"
_FIELDS = "sha256, autov3, legacy, crc32, blake3"


def _connect() -> sqlite3.Connection:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=5)
    db.execute(f"CREATE TABLE IF NOT EXISTS {_TABLE} ({_KEY}, sha256 TEXT NOT NULL, autov3 TEXT,"
               f" legacy TEXT NOT NULL, crc32 TEXT NOT NULL, blake3 TEXT NOT NULL, PRIMARY KEY ({_KEY}))")
    return db


def _cache_get(ident: tuple) -> FileHashes | None:
    try:
        with _connect() as db:
            row = db.execute(
                f"SELECT {_FIELDS} FROM {_TABLE} WHERE path=? AND device=? AND inode=? AND size=?"
                " AND mtime_ns=? AND ctime_ns=?", ident,
            ).fetchone()
        return FileHashes(*row) if row else None
    except (sqlite3.Error, OSError):
        return None


def _cache_put(ident: tuple, hashes: FileHashes) -> None:
    try:
        with _connect() as db:
            db.execute(f"INSERT OR REPLACE INTO {_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (*ident, hashes.sha256, hashes.autov3, hashes.legacy, hashes.crc32, hashes.blake3))
    except (sqlite3.Error, OSError):
        pass
