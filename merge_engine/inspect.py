"""What a checkpoint is: architecture, components, dtypes, metadata, recorded lineage and hashes,
from its header."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from . import lora
from .architecture import ModelInfo, detect
from .checkpoint import FileVersion, open_checkpoint
from .errors import CheckpointError, InputChangedError
from .hashing import hash_fd, hash_version
from .jsonsafe import try_loads
from .lineage import recorded_lineage


def inspect_checkpoint(path: str | os.PathLike[str], *, hashes: bool = True) -> dict[str, Any]:
    return inspect_version(path, hashes=hashes)[0]


def inspect_version(path: str | os.PathLike[str], *, hashes: bool = True) -> tuple[dict[str, Any], FileVersion]:
    """The report, and the version of the file it describes: header and hashes are read through
    one open file, and a file that changed meanwhile is an error (InputChangedError)."""
    path = Path(path)
    with open_checkpoint(path) as checkpoint:
        try:
            info = detect(checkpoint.tensors, model=checkpoint.name)
        except CheckpointError:
            found, _ = lora.modules(checkpoint)
            if not found:
                raise
            info = ModelInfo(lora.trained_for(checkpoint, found), None, flags={"lora": True})
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
            "lineage": recorded_lineage(checkpoint.metadata),
            "warnings": list(info.warnings),
        }
        if info.flags.get("lora"):
            result["lora"] = lora.summary(checkpoint)
        if hashes:
            fd = checkpoint.fileno()
            found, version = hash_fd(fd, path.resolve()) if fd is not None else hash_version(path)
            if version != checkpoint.version:
                raise InputChangedError("the file changed while it was inspected", model=checkpoint.name,
                                        details={"path": str(path)})
            result["hashes"] = found.to_dict()
        if spec := {k.removeprefix("modelspec."): v for k, v in checkpoint.metadata.items() if k.startswith("modelspec.")}:
            if hashes and found.autov3 and "hash_sha256" in spec:  # the ModelSpec label checked against the data
                spec["hash_ok"] = spec["hash_sha256"].lower() == "0x" + found.autov3
            result["modelspec"] = spec
    return result, checkpoint.version


def _maybe_json(value: str) -> Any:
    """A metadata value that holds JSON (A1111's recipes), decoded; anything else, poison
    included (nested too deep, numbers of thousands of digits), as the text it is."""
    if value[:1] in "{[" and (decoded := try_loads(value)) is not None:
        return decoded
    return value
