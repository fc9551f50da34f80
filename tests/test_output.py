"""The block writer on its own: pieces put out of order from several threads, through direct I/O
or the page cache, come out as the exact file and its sha256; a failing disk is a clear error."""

from __future__ import annotations

import hashlib
import os
import random
import threading

import pytest

from merge_engine import output
from merge_engine.errors import StorageError
from merge_engine.output import BlockWriter

BLOCK = 2 * output.ALIGN


def pieces(size: int, seed: int) -> list[tuple[int, int]]:
    """(offset, length) pieces covering [0, size), of uneven lengths, in a shuffled order."""
    rng = random.Random(seed)
    cuts, offset = [], 0
    while offset < size:
        length = min(size - offset, rng.choice([1, 3, 100, BLOCK - 5, BLOCK, 3 * BLOCK + 7]))
        cuts.append((offset, length))
        offset += length
    rng.shuffle(cuts)
    return cuts


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
@pytest.mark.parametrize("size", [1, BLOCK, 5 * BLOCK + 123])
def test_pieces_from_threads_make_the_exact_file(tmp_path, monkeypatch, direct, size):
    if not direct:
        monkeypatch.setattr(output, "_set_direct", lambda fd, on: False)
    data = random.Random(size).randbytes(size)
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.ftruncate(fd, size)
    writer = BlockWriter(fd, size, threads=3, hash_from=0, name="out.bin", block_bytes=BLOCK)
    work = pieces(size, seed=size)

    def put(share: list[tuple[int, int]]) -> None:
        for offset, length in share:
            into = writer.claim(offset, length, 1) if length % 2 else None  # both ways in
            if into is not None:
                into[:] = data[offset:offset + length]
                writer.commit(offset, length)
            else:
                writer.put(offset, data[offset:offset + length])

    threads = [threading.Thread(target=put, args=(work[i::3],)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(writer.maps) <= 2 * 3 + 6  # memory is bounded by the thread count, not the file size
    digest = writer.finish()
    os.close(fd)
    written = path.read_bytes()
    assert written == data
    assert digest == hashlib.sha256(written).hexdigest()


def test_claim_refuses_ranges_it_cannot_hand_out(tmp_path):
    fd = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    writer = BlockWriter(fd, 3 * BLOCK, threads=1, hash_from=None, name="out.bin", block_bytes=BLOCK)
    assert writer.claim(BLOCK - 4, 8, 2) is None  # crosses a block boundary
    assert writer.claim(2, 8, 4) is None  # not aligned for a 4-byte type
    assert len(writer.claim(4, 8, 4)) == 8
    writer.abort()
    os.close(fd)


def test_a_failing_disk_is_a_clear_error():
    """/dev/full refuses every write with ENOSPC, as a disk that fills up halfway would."""
    fd = os.open("/dev/full", os.O_WRONLY)
    writer = BlockWriter(fd, 4 * BLOCK, threads=2, hash_from=0, name="merged.safetensors", block_bytes=BLOCK)
    with pytest.raises(StorageError, match="disk is full") as raised:
        for offset in range(0, 4 * BLOCK, BLOCK):
            writer.put(offset, bytes(BLOCK))
        writer.finish()
    assert raised.value.model == "merged.safetensors"
    writer.abort()
    os.close(fd)
