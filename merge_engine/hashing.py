"""The hashes users recognise, computed in one read and remembered per (path, size, mtime).

* sha256 of the whole file: A1111's "new" hash (its first 10 hex digits are the "Model hash"
  in generation parameters) and Civitai's AutoV2.
* legacy: A1111's old 8-hex hash, sha256 of 64 KiB at offset 1 MiB (Civitai's AutoV1).
* autov3: sha256 of everything after the safetensors header, which survives metadata edits.

Hashing a 2-7 GB file takes seconds, so results are cached in a small SQLite file, like the
WebUI's hash cache. The cache is an optimisation only: any failure to use it is ignored.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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
    path = Path(path).resolve()
    stat = path.stat()
    ident = (str(path), stat.st_size, stat.st_mtime_ns)
    if use_cache and (hit := _cache_get(ident)) is not None:
        return hit
    hashes = compute_hashes(path)
    if use_cache:
        _cache_put(ident, hashes)
    return hashes


def compute_hashes(path: Path) -> FileHashes:
    full = hashlib.sha256()
    after_header = hashlib.sha256() if path.suffix.lower() == ".safetensors" else None
    with open(path, "rb", buffering=0) as f:
        head = f.read(8)
        data_start = 8 + struct.unpack("<Q", head)[0] if after_header and len(head) == 8 else None
        f.seek(0)
        pos = 0
        # hashlib drops the GIL on large buffers, so the two digests run on two cores.
        with ThreadPoolExecutor(1) as pool:
            while chunk := f.read(CHUNK):
                pending = pool.submit(full.update, chunk)
                if after_header is not None and data_start is not None and pos + len(chunk) > data_start:
                    after_header.update(memoryview(chunk)[max(0, data_start - pos):])
                pending.result()
                pos += len(chunk)
        f.seek(LEGACY_OFFSET)
        legacy = hashlib.sha256(f.read(LEGACY_LENGTH)).hexdigest()[:8]
    return FileHashes(full.hexdigest(), after_header.hexdigest() if after_header else None, legacy)


def _connect() -> sqlite3.Connection:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=5)
    db.execute(
        "CREATE TABLE IF NOT EXISTS hashes (path TEXT, size INTEGER, mtime_ns INTEGER,"
        " sha256 TEXT, autov3 TEXT, legacy TEXT, PRIMARY KEY (path, size, mtime_ns))"
    )
    return db


def _cache_get(ident: tuple[str, int, int]) -> FileHashes | None:
    try:
        with _connect() as db:
            row = db.execute(
                "SELECT sha256, autov3, legacy FROM hashes WHERE path=? AND size=? AND mtime_ns=?", ident
            ).fetchone()
        return FileHashes(*row) if row else None
    except (sqlite3.Error, OSError):
        return None


def _cache_put(ident: tuple[str, int, int], hashes: FileHashes) -> None:
    try:
        with _connect() as db:
            db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)",
                       (*ident, hashes.sha256, hashes.autov3, hashes.legacy))
    except (sqlite3.Error, OSError):
        pass
