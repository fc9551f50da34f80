"""What a checkpoint is: architecture, components, dtypes, metadata and hashes, from its header."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .architecture import detect
from .checkpoint import open_checkpoint
from .hashing import hash_file


def inspect_checkpoint(path: str | os.PathLike[str], *, hashes: bool = True) -> dict[str, Any]:
    path = Path(path)
    with open_checkpoint(path) as checkpoint:
        info = detect(checkpoint.tensors, model=checkpoint.name)
        components = {}
        for component, keys in info.components.items():
            tensors = [checkpoint.tensors[info.key_map.get(k, k)] for k in keys]
            components[component] = {
                "keys": len(keys),
                "params": sum(t.numel for t in tensors if t.is_float),
                "dtypes": dict(Counter(t.dtype for t in tensors)),
                "reference_layout": info.reference_layout.get(component, False),
            }
        result: dict[str, Any] = {
            "file": path.name,
            "size": checkpoint.size,
            "format": checkpoint.format,
            "architecture": info.architecture,
            "variant": info.variant,
            "components": components,
            "other_keys": list(info.other),
            "ema_keys": len(info.ema),
            "flags": info.flags,
            "metadata": {k: _maybe_json(v) for k, v in checkpoint.metadata.items()},
            "warnings": list(info.warnings),
        }
    if hashes:
        result["hashes"] = hash_file(path).to_dict()
    return result


def _maybe_json(value: str) -> Any:
    if value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value
