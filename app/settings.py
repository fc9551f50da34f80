"""Service settings: read once from the environment into one frozen object.

`sdmerge serve` turns its flags into the same environment variables before anything reads
them, so the API, its child worker and any `sdmerge worker` agree on one source of truth.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# The embedded default: SQLite and a broker that needs no server, both inside the data dir.
DEFAULT_DATA_DIR = "./data"
DEFAULT_LEASE_SECONDS = 60
DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024**3
DEFAULT_MAX_JSON_BYTES = 8 * 1024**2  # a recipe of 1,000 models with long names is under 200 KB
DEFAULT_MIN_FREE_BYTES = 1024**3
# A merge reading more than this is split into shards that any workers run (one per this much
# reading): 8 GiB is about four SDXL fp16 inputs, a minute or two of reading on one disk.
DEFAULT_SHARD_BYTES = 8 * 1024**3


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    broker_url: str | None
    model_roots: tuple[Path, ...]
    api_token: str | None = None
    job_lease_seconds: float = DEFAULT_LEASE_SECONDS
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES  # /ready says not ready below this free space
    merge_threads: int = 0
    merge_device: str = "cpu"
    verify_inputs: bool = False  # also sha256 every input during a merge (see ExecOptions.verify_inputs)
    preview_device: str = "auto"
    db_pool_size: int = 10
    log_format: str = "text"  # or "json": one object a line, the job id on each (app/logs.py)
    merge_shards: int = 0  # shards per merge; 0: one per `shard_bytes` of input read; 1: never split
    shard_bytes: int = DEFAULT_SHARD_BYTES

    @property
    def embedded(self) -> bool:
        """No broker URL: the filesystem broker in the data dir, the worker a child of `serve`."""
        return self.broker_url is None

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def artifact_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def upload_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        """Configured model roots plus the upload folder, resolved (symlinks followed) once."""
        return tuple(root.resolve() for root in (*self.model_roots, self.upload_dir))

    @property
    def reaper_interval(self) -> float:
        return max(0.5, self.job_lease_seconds / 3)

    def prepare_dirs(self) -> None:
        for folder in (self.data_dir, self.tmp_dir, self.artifact_dir, self.upload_dir, self.broker_dir):
            folder.mkdir(parents=True, exist_ok=True)


def settings_from_env(env: dict[str, str] | os._Environ = os.environ) -> Settings:
    data_dir = Path(env.get("SDMERGE_DATA_DIR") or DEFAULT_DATA_DIR).absolute()
    roots = tuple(Path(p).absolute() for p in env.get("SDMERGE_MODEL_ROOTS", "").split(":") if p)
    return Settings(
        data_dir=data_dir,
        database_url=env.get("SDMERGE_DATABASE_URL") or f"sqlite:///{data_dir / 'sdmerge.db'}",
        broker_url=env.get("SDMERGE_BROKER_URL") or None,
        model_roots=roots,
        api_token=env.get("SDMERGE_API_TOKEN") or None,
        job_lease_seconds=float(env.get("SDMERGE_JOB_LEASE_SECONDS", DEFAULT_LEASE_SECONDS)),
        max_upload_bytes=int(env.get("SDMERGE_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)),
        max_json_bytes=int(env.get("SDMERGE_MAX_JSON_BYTES", DEFAULT_MAX_JSON_BYTES)),
        min_free_bytes=int(env.get("SDMERGE_MIN_FREE_BYTES", DEFAULT_MIN_FREE_BYTES)),
        merge_threads=int(env.get("SDMERGE_MERGE_THREADS", 0)),
        merge_device=env.get("SDMERGE_MERGE_DEVICE", "cpu"),
        verify_inputs=env.get("SDMERGE_VERIFY_INPUTS", "0").lower() in ("1", "true", "yes"),
        preview_device=env.get("SDMERGE_PREVIEW_DEVICE") or "auto",
        db_pool_size=int(env.get("SDMERGE_DB_POOL_SIZE", 10)),
        log_format=(env.get("SDMERGE_LOG_FORMAT") or "text").lower(),
        merge_shards=int(env.get("SDMERGE_MERGE_SHARDS") or 0),
        shard_bytes=int(env.get("SDMERGE_SHARD_BYTES") or DEFAULT_SHARD_BYTES),
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return settings_from_env()
