"""Finding recipe leaves on disk for the CLI: next to the recipe, then under model roots.

The service resolves leaves against its registry instead; both hand the planner the same
`ResolvedModel`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from .errors import ResolveError, SdmergeError
from .hashing import hash_file
from .plan import ResolvedModel
from .recipe import Leaf, ModelLeaf

CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


class FileResolver:
    """Leaves are found by content where the recipe names it: a `{"sha256", "name"}` leaf is the
    file under the model roots with that sha256 (published files get renamed; legacy hashes
    collide), its name only a hint of where to look first. Plain references are paths, relative
    to the recipe's folder or to a model root, or file names found under the roots."""

    def __init__(self, base_dir: str | os.PathLike[str], model_roots: Sequence[str | os.PathLike[str]] = ()):
        self.base_dir = Path(base_dir)
        self.model_roots = [Path(r) for r in model_roots]
        self._by_name: dict[str, list[Path]] | None = None

    def __call__(self, leaf: Leaf) -> ResolvedModel:
        if isinstance(leaf, ModelLeaf):
            if leaf.sha256 is None:
                path = self.find(leaf.name or "", required=True)
            elif (path := self.locate(leaf.sha256, leaf.name)) is None:
                raise ResolveError(f"no file next to the recipe or under the model roots ({self._roots()}) "
                                   f"has sha256 {leaf.sha256[:10]}…", model=leaf.label())
            assert path is not None
            return ResolvedModel(path, path.name)
        if leaf.startswith("sha256:"):
            return self._by_sha256(leaf.removeprefix("sha256:").lower(), leaf)
        path = self.find(leaf, required=True)
        assert path is not None
        return ResolvedModel(path, path.name)

    def locate(self, sha256: str | None, name: str | None) -> Path | None:
        """The file with this sha256 (the file named `name` first, then every file under the roots,
        hashed once each through the hash cache), or, without a sha256, the file named `name`."""
        hinted = self.find(name, required=False) if name else None
        if sha256 is None or (hinted is not None and _sha256(hinted) == sha256):
            return hinted
        matches = sorted({p.resolve() for p in self._files() if _sha256(p) == sha256})
        return matches[0] if matches else None  # several copies of one file are one model

    def find(self, ref: str, *, required: bool) -> Path | None:
        """A path (relative to the recipe's folder or to a model root, or absolute), or a bare file
        name found under the roots (an ambiguous name is an error)."""
        try:
            candidates = [Path(ref)] if Path(ref).is_absolute() else [self.base_dir / ref,
                                                                     *(root / ref for root in self.model_roots)]
            for candidate in candidates:
                if candidate.is_file():
                    return candidate
        except (OSError, ValueError):  # a NUL byte, a name too long for the file system
            if required:
                raise ResolveError("not a usable file path", model=ref) from None
            return None
        matches = self._names().get(Path(ref).name, []) if os.sep not in ref and "/" not in ref else []
        if len(matches) > 1:
            raise ResolveError(
                f"name is ambiguous under the model roots: {', '.join(str(m) for m in matches)}", model=ref
            )
        if matches:
            return matches[0]
        if required:
            raise ResolveError(f"no such model file next to the recipe ({self.base_dir}) or under the model roots "
                               f"({self._roots()})", model=ref)
        return None

    def _roots(self) -> str:
        return ", ".join(str(r) for r in self.model_roots) or "none given (--model-root)"

    def _names(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            self._by_name = {}
            for root in self.model_roots:
                for path in sorted(_checkpoint_files(root)):
                    self._by_name.setdefault(path.name, []).append(path)
        return self._by_name

    def _files(self) -> list[Path]:
        return [p for paths in self._names().values() for p in paths]

    def _by_sha256(self, prefix: str, label: str) -> ResolvedModel:
        if len(prefix) < 10 or any(c not in "0123456789abcdef" for c in prefix):
            raise ResolveError("a sha256 reference needs at least 10 hex digits", model=label)
        found: dict[str, list[Path]] = {}
        for path in self._files():
            if (sha := _sha256(path)) and sha.startswith(prefix):
                found.setdefault(sha, []).append(path.resolve())
        if len(found) != 1:
            what = "no file under the model roots has" if not found else "files with different sha256s have"
            raise ResolveError(f"{what} this sha256 prefix", model=label, details={"matches": sorted(found)})
        path = sorted(next(iter(found.values())))[0]
        return ResolvedModel(path, path.name)


def _sha256(path: Path) -> str | None:
    try:
        return hash_file(path).sha256
    except (OSError, SdmergeError):  # unreadable, or changing while hashed: not the file sought
        return None


def _checkpoint_files(root: Path):
    for folder, _, files in os.walk(root, followlinks=False):
        for name in files:
            if name.lower().endswith(CHECKPOINT_SUFFIXES):
                yield Path(folder) / name
