"""Finding recipe leaves on disk for the CLI: next to the recipe, then under model roots.

The service resolves leaves against its registry instead; both hand the planner the same
`ResolvedModel`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from .errors import ResolveError
from .hashing import hash_file
from .plan import ResolvedModel
from .recipe import Leaf, ModelLeaf

CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


class FileResolver:
    def __init__(self, base_dir: str | os.PathLike[str], model_roots: Sequence[str | os.PathLike[str]] = ()):
        self.base_dir = Path(base_dir)
        self.model_roots = [Path(r) for r in model_roots]
        self._by_name: dict[str, list[Path]] | None = None

    def __call__(self, leaf: Leaf) -> ResolvedModel:
        if isinstance(leaf, ModelLeaf):
            if leaf.name and (path := self.find(leaf.name, required=leaf.sha256 is None)):
                return ResolvedModel(path, path.name)
            return self._by_sha256(leaf.sha256 or "", leaf.label())
        if leaf.startswith("sha256:"):
            return self._by_sha256(leaf.removeprefix("sha256:").lower(), leaf)
        path = self.find(leaf, required=True)
        assert path is not None
        return ResolvedModel(path, path.name)

    def find(self, ref: str, *, required: bool) -> Path | None:
        direct = Path(ref) if Path(ref).is_absolute() else self.base_dir / ref
        if direct.is_file():
            return direct
        matches = self._names().get(Path(ref).name, []) if os.sep not in ref and "/" not in ref else []
        if len(matches) > 1:
            raise ResolveError(
                f"name is ambiguous under the model roots: {', '.join(str(m) for m in matches)}", model=ref
            )
        if matches:
            return matches[0]
        if required:
            roots = ", ".join(str(r) for r in self.model_roots) or "none given (--model-root)"
            raise ResolveError(f"no such model file next to the recipe ({self.base_dir}) or under the model roots ({roots})",
                               model=ref)
        return None

    def _names(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            self._by_name = {}
            for root in self.model_roots:
                for path in sorted(_checkpoint_files(root)):
                    self._by_name.setdefault(path.name, []).append(path)
        return self._by_name

    def _by_sha256(self, prefix: str, label: str) -> ResolvedModel:
        if len(prefix) < 10 or any(c not in "0123456789abcdef" for c in prefix):
            raise ResolveError("a sha256 reference needs at least 10 hex digits", model=label)
        found = {p.resolve() for paths in self._names().values() for p in paths
                 if hash_file(p).sha256.startswith(prefix)}
        if len(found) != 1:
            what = "no file under the model roots has" if not found else "several files have"
            raise ResolveError(f"{what} this sha256", model=label)
        path = found.pop()
        return ResolvedModel(path, path.name)


def _checkpoint_files(root: Path):
    for folder, _, files in os.walk(root, followlinks=False):
        for name in files:
            if name.lower().endswith(CHECKPOINT_SUFFIXES):
                yield Path(folder) / name
