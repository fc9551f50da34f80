"""Where files may come from and go to: model roots, the upload folder, the artifact store."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from app.errors import BadRequest, PathNotAllowed
from app.settings import Settings
from merge_engine.checkpoint import open_checkpoint
from merge_engine.errors import CheckpointError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
NAME_PATTERN = re.compile(r"[A-Za-z0-9._\- ]{1,255}")
# A safetensors file begins with its header length and then `{`; torch pickles are zip files.
ZIP_MAGIC = b"PK\x03\x04"
UPLOAD_PARTIAL_GRACE_SECONDS = 600
# A leased attempt's partial file or folder in tmp/: <kind>-<id>-<lease owner>.…partial; a
# sharded job's shared file: shards-<job id>-<recipe hash prefix>.partial, kept while the job lives.
PARTIAL_NAME = re.compile(r"(job|analysis|preview|shards)-(\d+)-([0-9a-f]+)\.")
RESULT_FOLDERS = {"analysis": "analyses", "preview": "previews"}  # under artifacts/


def check_name(name: str, what: str = "name") -> str:
    if not NAME_PATTERN.fullmatch(name) or name.strip(" .") == "":
        raise BadRequest(f"{what} may hold only letters, digits, '.', '-', '_' and spaces",
                         details={what: name})
    return name


def confine(settings: Settings, path: str) -> Path:
    """The real path of `path` (relative to a model root, or absolute) if it lies inside a root."""
    roots = settings.allowed_roots
    if "\0" in path:
        raise PathNotAllowed("path holds a NUL byte", details={"path": path[:200]})
    candidates = [Path(path)] if os.path.isabs(path) else [root / path for root in roots]
    for candidate in candidates:
        try:
            real = candidate.resolve()
            inside = any(real.is_relative_to(root) for root in roots)
            found = inside and real.is_file()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name too long
            raise PathNotAllowed(f"path cannot be resolved: {exc}", details={"path": path[:200]}) from None
        if inside:
            if found:
                return real
            continue
        raise PathNotAllowed("path is outside the model roots (after following symlinks)",
                             details={"path": path, "roots": [str(r) for r in roots]})
    raise PathNotAllowed("no such file under the model roots",
                         details={"path": path, "roots": [str(r) for r in roots]})


def check_checkpoint_header(path: Path, name: str) -> None:
    """Refuse files that are not checkpoints, reading the header only; hashing and full
    inspection happen in the worker, which marks the model failed if the rest is broken."""
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"not a checkpoint: expected one of {', '.join(CHECKPOINT_SUFFIXES)}",
                              model=name)
    if suffix == ".safetensors":
        open_checkpoint(path, name=name).close()
        return
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:
            raise CheckpointError("not a torch checkpoint (no zip archive header)", model=name)


def artifact_path(settings: Settings, sha256: str) -> Path:
    return settings.artifact_dir / sha256[:2] / f"{sha256}.safetensors"


def job_output_path(settings: Settings, job_id: int, owner: str) -> Path:
    """Where one attempt writes before the artifact is stored by its hash: unique per lease."""
    return settings.tmp_dir / f"job-{job_id}-{owner}.safetensors.partial"


def shared_partial_path(settings: Settings, job_id: int, recipe_hash: str) -> Path:
    """The one file every shard of a sharded job writes into (merge_engine/shards.py): it
    outlives the attempts of any one worker, so it is named by the job, not by a lease."""
    return settings.tmp_dir / f"shards-{job_id}-{shared_partial_token(recipe_hash)}.partial"


def shared_partial_token(recipe_hash: str) -> str:
    return recipe_hash[:16]


def staging_dir(settings: Settings, kind: str, row_id: int, owner: str) -> Path:
    """A folder one attempt of an analysis or preview writes into: unique per lease."""
    return settings.tmp_dir / f"{kind}-{row_id}-{owner}.partial"


def result_dir(settings: Settings, kind: str, row_id: int) -> Path:
    """Where a finished analysis or preview's files are, e.g. `artifacts/analyses/7/`. It appears
    by one rename of a complete staging folder, done only by the holder of the row's lease."""
    return settings.artifact_dir / RESULT_FOLDERS[kind] / str(row_id)



def publish_dir(staged: Path, target: Path) -> None:
    """Move a complete folder into place at once. A folder already there is a leftover of an
    attempt whose result was never recorded (nobody reads it), so it is replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staged, target)


def clean_partials(settings: Settings, live_leases: set[tuple[str, int, str]]) -> list[Path]:
    """Remove leftovers of crashed attempts and uploads; keep those of leases still running
    (`live_leases` holds (kind, id, owner): kind `job`, `analysis` or `preview`, or `shards`
    with the job's token for the shared file of a sharded job still queued or running)."""
    removed = []
    now = time.time()
    for entry in settings.tmp_dir.glob("*.partial"):
        match = PARTIAL_NAME.search(entry.name)  # also the engine's own `.job-….partial.<pid>….partial`
        if match and (match[1], int(match[2]), match[3]) in live_leases:
            continue
        try:
            if not match and now - _last_write(entry) < UPLOAD_PARTIAL_GRACE_SECONDS:
                continue  # an upload still streaming in another API process
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed



def _last_write(entry: Path) -> float:
    if entry.is_dir():
        return max((p.stat().st_mtime for p in entry.iterdir()), default=entry.stat().st_mtime)
    return entry.stat().st_mtime
