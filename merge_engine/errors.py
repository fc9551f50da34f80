"""The domain errors of the merge engine: one small tree, each naming where the problem is.

Every error a user can cause (a bad recipe, a bad file, incompatible models) is a
`SdmergeError`. The CLI prints it as one line and exits 2; the service maps `code` to an
HTTP status in one handler. Anything else escaping the engine is a bug.
"""

from __future__ import annotations

from typing import Any


class SdmergeError(Exception):
    """A problem with the user's input, naming the model, component and key at fault."""

    code = "sdmerge_error"

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        component: str | None = None,
        key: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.model = model
        self.component = component
        self.key = key
        self.details = dict(details or {})

    def where(self) -> dict[str, str]:
        return {
            name: value
            for name, value in (("model", self.model), ("component", self.component), ("key", self.key))
            if value is not None
        }

    def __str__(self) -> str:
        where = ", ".join(f"{name} {value!r}" for name, value in self.where().items())
        return f"{self.message} [{where}]" if where else self.message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": str(self), "details": {**self.where(), **self.details}}


class RecipeError(SdmergeError):
    """The recipe itself is invalid (structure, weights, references to its own output)."""

    code = "invalid_recipe"


class ResolveError(SdmergeError):
    """A model reference names no file, or more than one."""

    code = "unknown_model"


class CheckpointError(SdmergeError):
    """A file is not a readable checkpoint: truncated, lying header, hostile pickle, ..."""

    code = "bad_checkpoint"


class InputChangedError(CheckpointError):
    """A file was written, truncated or replaced while it was read, or since it was hashed: what
    was read may not be what its recorded hashes describe."""

    code = "input_changed"


class ArchitectureError(SdmergeError):
    """Sources of a merge belong to different architectures or UNet variants."""

    code = "architecture_mismatch"


class LayoutMismatchError(SdmergeError):
    """Sources of one component disagree on keys, shapes or integer values."""

    code = "layout_mismatch"


class NonFiniteError(SdmergeError):
    """An input tensor holds NaN or Inf."""

    code = "non_finite"


class MergeCancelled(SdmergeError):
    """The caller asked the running merge to stop."""

    code = "cancelled"


class OptionsError(SdmergeError):
    """An execution option (device, threads) cannot be honoured here."""

    code = "invalid_options"


class StorageError(SdmergeError):
    """The output cannot be written: no space left, or the folder is not writable."""

    code = "insufficient_storage"
