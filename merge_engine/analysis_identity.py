"""Identical components: byte-for-byte equality, found without hashing every byte of every model.

The Gram pass already flags the candidates: pairs whose distance is zero to rounding. Only
those are confirmed, by blake2b digests of the component's bytes in canonical key order (a
second read of the suspects' components only); hard links to one file need no reading at all.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch

from .checkpoint import Checkpoint

DIGEST_CHUNK = 4 << 20
SUSPECT = 1e-9  # d² below this fraction of the squared norms (about the Gram's rounding) is "zero"


def identical_groups(gram: np.ndarray, checkpoints: Sequence[Checkpoint],
                     file_keys: Sequence[Sequence[str]]) -> list[list[int]]:
    """Groups (positions of models) whose component is byte for byte the same.

    `gram` is the pivot-last (N+1) x (N+1) Gram of the component; `file_keys[i]` lists model i's
    keys of the component in canonical order."""
    n = len(gram) - 1
    diag = np.diag(gram)[:n]
    d2 = diag[:, None] + diag[None, :] - 2 * gram[:n, :n]
    suspects = d2 <= SUSPECT * (diag[:, None] + diag[None, :])
    groups: list[list[int]] = []
    digests: dict[int, str] = {}

    def same(i: int, j: int) -> bool:
        a, b = checkpoints[i], checkpoints[j]
        if a.format == b.format == "safetensors":
            sa, sb = os.stat(a.path), os.stat(b.path)
            if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):  # hard links: one file
                return True
        for k in (i, j):
            if k not in digests:
                digests[k] = component_digest(checkpoints[k], file_keys[k])
        return digests[i] == digests[j]

    for i in range(n):
        group = next((g for g in groups if suspects[i, g[0]] and same(i, g[0])), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    return [g for g in groups if len(g) > 1]


def component_digest(checkpoint: Checkpoint, file_keys: Sequence[str]) -> str:
    """blake2b of a component's tensor bytes in canonical key order, with each dtype and shape."""
    digest = hashlib.blake2b(digest_size=32)
    staging = torch.empty(DIGEST_CHUNK, dtype=torch.uint8)
    for key in file_keys:
        info = checkpoint.tensors[key]
        digest.update(f"{info.dtype}{list(info.shape)};".encode())  # names may differ, bytes may not
        step = DIGEST_CHUNK // (info.nbytes // max(info.numel, 1) or 1)
        for start in range(0, info.numel, step):
            values = checkpoint.read_into(key, start, min(start + step, info.numel), staging)
            digest.update(memoryview(values.contiguous().view(torch.uint8).numpy()))
            checkpoint.check_intact(key)
        checkpoint.release()
    return digest.hexdigest()
