"""The hashes users recognise, against independent computations over the same bytes, the forms
Civitai shows, and the hash cache's upgrade from the table that lacked CRC32 and BLAKE3."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import zlib

import blake3
import pytest

from merge_engine import hashing
from merge_engine.hashing import cache_path, hash_file, hash_version


def expected(raw: bytes, safetensors: bool = True) -> dict:
    header_end = 8 + int.from_bytes(raw[:8], "little")
    return {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "autov3": hashlib.sha256(raw[header_end:]).hexdigest() if safetensors else None,
        "legacy": hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8],
        "crc32": f"{zlib.crc32(raw) & 0xFFFFFFFF:08x}",
        "blake3": blake3.blake3(raw).hexdigest(),
    }


@pytest.mark.parametrize("chunk", [hashing.CHUNK, 4096, 1000])  # the data section starts mid-chunk
def test_every_hash_matches_an_independent_computation(make_model, monkeypatch, chunk):
    monkeypatch.setattr(hashing, "CHUNK", chunk)
    path = make_model("a.safetensors", seed=1)
    raw = path.read_bytes()
    assert len(raw) > 0x110000  # the legacy hash's window is inside the file
    found = hash_file(path, use_cache=False)
    want = expected(raw)
    assert {k: getattr(found, k) for k in want} == want
    assert found.shorthash == want["sha256"][:10]


def test_the_forms_civitai_shows(make_model):
    path = make_model("a.safetensors", seed=2)
    found = hash_file(path, use_cache=False).to_dict()
    want = expected(path.read_bytes())
    assert found["civitai"] == {
        "AutoV1": want["legacy"].upper(), "AutoV2": want["sha256"][:10].upper(), "AutoV3": want["autov3"][:12].upper(),
        "SHA256": want["sha256"].upper(), "CRC32": want["crc32"].upper(), "BLAKE3": want["blake3"].upper(),
    }
    assert [len(found["civitai"][k]) for k in ("AutoV1", "AutoV2", "AutoV3", "CRC32", "BLAKE3")] == [8, 10, 12, 8, 64]


def test_a_file_that_is_not_safetensors_has_no_autov3(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(os.urandom(0x120000 + 17))
    found = hash_file(path, use_cache=False)
    assert found.autov3 is None and "AutoV3" not in found.civitai
    want = expected(path.read_bytes(), safetensors=False)
    assert {k: getattr(found, k) for k in want} == want


def test_cached_hashes_carry_every_field(make_model):
    path = make_model("a.safetensors", seed=3)
    first, version = hash_version(path)
    with sqlite3.connect(cache_path()) as db:
        rows = db.execute("SELECT crc32, blake3 FROM file_hashes_v2 WHERE path=? AND inode=?",
                          (str(path.resolve()), version.inode)).fetchall()
    assert rows == [(first.crc32, first.blake3)]
    assert hash_file(path) == first


def test_a_row_of_the_old_cache_table_is_a_miss(make_model, tmp_path, monkeypatch):
    """A cache written before CRC32 and BLAKE3 holds rows without them: they are never answered."""
    monkeypatch.setenv("SDMERGE_HASH_CACHE", str(tmp_path / "old.sqlite3"))
    path = make_model("a.safetensors", seed=4).resolve()
    stat = path.stat()
    key = "path, device, inode, size, mtime_ns, ctime_ns"
    with sqlite3.connect(tmp_path / "old.sqlite3") as db:
        db.execute(f"CREATE TABLE file_hashes ({key}, sha256 TEXT, autov3 TEXT, legacy TEXT, PRIMARY KEY ({key}))")
        db.execute("INSERT INTO file_hashes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                    "0" * 64, "1" * 64, "22222222"))
    found = hash_file(path)
    want = expected(path.read_bytes())
    assert {k: getattr(found, k) for k in want} == want  # computed, not the old row's stale values
    assert hash_file(path) == found  # and cached again, whole
