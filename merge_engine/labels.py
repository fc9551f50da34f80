"""ModelSpec labels (Stability AI's "SAI Model Spec" 1.0.1, the `modelspec.*` metadata keys that
ComfyUI, Forge, kohya's scripts and model sites read), and the hash they carry.

`modelspec.hash_sha256` is `0x` + the sha256 of every byte after the header (the AutoV3 of
Civitai, in full). It depends on the data, and the header comes first in the file: so the plan
lays the header out with a fixed-width placeholder of 64 zeros, the writer hashes the data
section as its blocks go out in order, and `seal` writes the 64 digits into the placeholder
afterwards. The file is still written in one pass. The whole file's sha256 (the artifact's
name, A1111's hash) covers the final header, so it can only be computed after the seal, by
reading the file back once; `seal` does that only where it is asked for.

What cannot be known from the files is left to the recipe: SD2's 512-base (epsilon) and 768-v
(v) checkpoints are identical in keys and shapes, and a date would make two runs of one recipe
differ. Any `modelspec.*` key given in `output.metadata` is written as given (checked where it
is one we also write), except the sealed hash and the spec version.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .errors import RecipeError, StorageError

if TYPE_CHECKING:
    from .plan import Plan

SPEC_VERSION = "1.0.1"
HASH_KEY = "modelspec.hash_sha256"
PLACEHOLDER = "0x" + "0" * 64
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # kohya's value for ldm checkpoints
RESERVED = (HASH_KEY, "modelspec.sai_model_spec")
FAMILY = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1"}
PREDICTION_TYPES = ("epsilon", "v")
RESOLUTION = {"sd1": 512, "sdxl": 1024}
READ_CHUNK = 8 << 20


def architecture_id(architecture: str, variant: str | None, prediction: str) -> str:
    """The spec's architecture ID of a checkpoint with a UNet (its listing's names where it has one)."""
    family = FAMILY[architecture]
    if architecture == "sdxl":
        return {"inpainting": "stable-diffusion-xl-v1-inpainting"}.get(variant or "", "stable-diffusion-xl-v1-base")
    if variant in (None, "normal"):
        if architecture == "sd2":
            return "stable-diffusion-v2-768-v" if prediction == "v" else "stable-diffusion-v2-512"
        return family
    return f"{family}-{variant}"


def modelspec(*, architecture: str | None, variant: str | None, components: Iterable[str], title: str,
              inputs: Iterable[tuple[str, Mapping[str, str]]], given: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The `modelspec.*` entries of an output (the hash as a placeholder), and warnings.

    `inputs` are (file name, metadata) of the merged checkpoints; `given` the recipe's own
    `output.metadata`, whose `modelspec.*` entries win over what is derived here."""
    if architecture is None:
        return {}, []  # a VAE alone, whose family no file tells: nothing the spec could name
    inputs = list(inputs)
    components = set(components)
    warnings: list[str] = []
    prediction = given.get("modelspec.prediction_type")
    if prediction is not None and prediction not in PREDICTION_TYPES:
        raise RecipeError(f"output.metadata modelspec.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                          f"not {prediction!r}")
    if prediction is None:
        prediction = _inputs_prediction(architecture, inputs, warnings)
    if "unet" in components:
        arch_id = architecture_id(architecture, variant, prediction)
    else:  # parts: the spec's form for components, e.g. stable-diffusion-xl-v1/vae
        base = architecture_id(architecture, "normal", prediction)
        part = "vae" if components == {"vae"} else "text-encoder" if "vae" not in components else "components"
        arch_id = f"{base}/{part}"
    if (claimed := given.get("modelspec.architecture")) is not None and not claimed.startswith(FAMILY[architecture]):
        raise RecipeError(f"output.metadata modelspec.architecture {claimed!r} is not a {architecture} architecture "
                          f"(the merge's is {arch_id!r})")
    spec = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": arch_id,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
    }
    if "unet" in components:
        size = RESOLUTION.get(architecture, 768 if prediction == "v" else 512)
        spec["modelspec.resolution"] = f"{size}x{size}"
        spec["modelspec.prediction_type"] = prediction
    if inputs:
        spec["modelspec.merged_from"] = ", ".join(
            meta.get("modelspec.title") or name.rsplit(".", 1)[0] for name, meta in inputs)
    spec.update({k: v for k, v in given.items() if k.startswith("modelspec.")})
    spec[HASH_KEY] = PLACEHOLDER
    return spec, warnings


def _inputs_prediction(architecture: str, inputs: list[tuple[str, Mapping[str, str]]], warnings: list[str]) -> str:
    """What the inputs' own labels say (where they all agree), else the family's default."""
    if architecture != "sd2":
        return "epsilon"
    said = {_declared_prediction(meta) for _, meta in inputs} - {None}
    if len(said) == 1:
        return said.pop()
    reason = "the inputs disagree" if said else "no input is labelled"
    warnings.append(f"SD2 768-v and 512-base checkpoints cannot be told apart and {reason}: the output is labelled "
                    "768-v (prediction type v); set output.metadata modelspec.prediction_type to \"epsilon\" for 512-base")
    return "v"


def _declared_prediction(meta: Mapping[str, str]) -> str | None:
    if meta.get("modelspec.prediction_type") in PREDICTION_TYPES:
        return meta["modelspec.prediction_type"]
    arch = meta.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-v2-768-v"):
        return "v"
    if arch.startswith("stable-diffusion-v2-512"):
        return "epsilon"
    return None


def hash_slot(header: bytes) -> int | None:
    """The file offset of the placeholder's 64 digits in `header` (the whole header, length
    prefix included), or None where the header reserves none."""
    needle = f'"{HASH_KEY}":"{PLACEHOLDER}"'.encode()
    at = header.find(needle)
    if at < 0:
        return None
    if header.find(needle, at + 1) >= 0:
        raise AssertionError("the header reserves the modelspec hash twice")  # keys are unique: a bug
    return at + len(needle) - 65  # the first of the 64 zeros, after '"0x'


def seal(fd: int, plan: Plan, *, autov3: str | None = None, sha256: bool = True) -> tuple[str | None, str | None]:
    """Fill the reserved `modelspec.hash_sha256` of the written file `fd` (laid out by `plan`, open
    for reading and writing) and return (autov3, the whole file's sha256 if asked). `autov3` is
    the data section's sha256 if the writer computed it; otherwise it is read back."""
    _buffered(fd)
    slot, data_start, size = plan.hash_slot, len(plan.header), plan.output_size
    if slot is not None:
        if autov3 is None:
            autov3 = _sha256_range(fd, data_start, size)
        digits = autov3.encode()
        try:
            if os.pwrite(fd, digits, slot) != len(digits):
                raise StorageError("cannot write the modelspec hash into the output's header")
        except OSError as exc:
            raise StorageError(f"cannot write the output: {exc.strerror}") from None
    return autov3, _sha256_range(fd, 0, size) if sha256 else None


def _sha256_range(fd: int, start: int, stop: int) -> str:
    """sha256 of bytes [start, stop), the next chunk read while this one is hashed (both let go
    of the GIL): the read-back costs the slower of the disk and the digest, not their sum."""
    digest = hashlib.sha256()

    def read(pos: int) -> bytes:
        chunk = os.pread(fd, min(READ_CHUNK, stop - pos), pos)
        if not chunk:
            raise StorageError(f"the output ends at byte {pos}, before its planned {stop}")
        return chunk

    with ThreadPoolExecutor(1, thread_name_prefix="read-back") as pool:
        pos = start
        pending = pool.submit(read, pos) if pos < stop else None
        while pending is not None:
            chunk = pending.result()
            following = pos + len(chunk)
            pending = pool.submit(read, following) if following < stop else None
            digest.update(chunk)
            if hasattr(os, "posix_fadvise"):  # a merge's output is not about to be read: leave the cache to the inputs
                os.posix_fadvise(fd, pos, len(chunk), os.POSIX_FADV_DONTNEED)
            pos = following
    return digest.hexdigest()


def _buffered(fd: int) -> None:
    """Small unaligned writes and reads need the page cache: turn direct I/O off for `fd`."""
    from .output import _set_direct

    _set_direct(fd, False)
