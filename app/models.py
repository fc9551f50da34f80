"""SQL rows: registered checkpoints, merge jobs and their artifacts, analyses and previews.

A merge job, an analysis and a preview are each leased work (`Leased`): the row is the truth,
and one lease, heartbeat and finish code (worker/lease.py) runs all three tables.
Times are naive UTC so SQLite and Postgres compare them the same way (lease expiry, reaper).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

MODEL_STATUSES = ("hashing", "ready", "failed")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
# A job in one of these states owns its recipe hash: a resubmission returns it instead.
LIVE_JOB_STATUSES = ("queued", "running", "succeeded")


MAX_ROW_ID = 2**63 - 1  # the largest BIGINT: ids and cursors beyond it name no row, in any database


def as_row_id(text: str) -> int | None:
    """`text` as a row id if it is one (ASCII digits, in range): `"²".isdigit()` is true too."""
    if text.isascii() and text.isdigit() and len(text) <= 19 and 1 <= int(text) <= MAX_ROW_ID:
        return int(text)
    return None


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime()}


class Model(Base):
    """A checkpoint file in the registry; hashes and header facts are filled in by the worker."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    path: Mapped[str] = mapped_column(String(4096), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    # Of the version that was hashed (set with the hashes): a merge refuses the file in any other.
    inode: Mapped[int | None] = mapped_column(BigInteger)
    ctime_ns: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="hashing")
    error: Mapped[str | None] = mapped_column(Text)
    architecture: Mapped[str | None] = mapped_column(String(32), index=True)
    components: Mapped[dict[str, Any] | None]
    header_metadata: Mapped[dict[str, Any] | None]
    # Lower-case hex; any of them finds the model (`GET /models?hash=`), as Civitai's search does.
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    autov3: Mapped[str | None] = mapped_column(String(64), index=True)
    legacy_hash: Mapped[str | None] = mapped_column(String(8), index=True)
    crc32: Mapped[str | None] = mapped_column(String(8), index=True)
    blake3: Mapped[str | None] = mapped_column(String(64), index=True)
    # What the header's metadata says the file was merged from (merge_engine.lineage), read in
    # full when the file is hashed: header_metadata keeps long values only as a note of their size.
    lineage: Mapped[dict[str, Any] | None]
    dispatched_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    def forget_hashes(self) -> None:
        """The file changed (or is to be hashed again): nothing recorded from it still holds."""
        self.sha256 = self.autov3 = self.legacy_hash = self.crc32 = self.blake3 = None
        self.lineage = None


class Artifact(Base):
    """An output file, stored once under its sha256 whichever jobs produced it."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(255))
    header_metadata: Mapped[dict[str, Any] | None]
    lineage: Mapped[dict[str, Any] | None]  # as Model.lineage, read from the metadata when stored
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Leased:
    """The columns of work a worker leases: status, progress, cancel flag, lease, attempts, times.

    `kind` names the work in task routing and in partial-file names (`<kind>-<id>-<owner>.`)."""

    kind: ClassVar[str]

    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    dispatched_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @classmethod
    def end_values(cls, status: str) -> dict[str, Any]:
        """Extra columns set when the work ends in `status` (cancelled at once, reaped, finished)."""
        return {}


class Job(Leased, Base):
    """One execution of a canonical recipe (leaves named by sha256), leased by one worker at a time."""

    __tablename__ = "jobs"
    kind = "job"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    recipe: Mapped[dict[str, Any]]
    recipe_hash: Mapped[str] = mapped_column(String(64), index=True)
    # Equal to recipe_hash while the job is live; NULL after failure or cancel. Its unique
    # constraint is what makes concurrent identical submissions collapse into one job.
    live_recipe_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    architecture: Mapped[str | None] = mapped_column(String(32))
    output_size: Mapped[int | None] = mapped_column(BigInteger)
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    artifact: Mapped[Artifact | None] = relationship(lazy="joined")
    # Shards the merge is split into (`MergeShard`): asked for at submit, or the count it runs
    # in once planned; NULL: from the settings (a small merge stays one task).
    shards: Mapped[int | None] = mapped_column(Integer)

    @classmethod
    def end_values(cls, status: str) -> dict[str, Any]:
        return {} if status == "succeeded" else {"live_recipe_hash": None}


class MergeShard(Leased, Base):
    """One shard of a sharded merge job: output keys [first_key, stop_key), which fill bytes
    [start, end) of the job's shared partial file (merge_engine/shards.py). Leased like a job,
    so a lost worker's shard is re-run; `sha256` is its range's digest, which the job's final
    step checks."""

    __tablename__ = "merge_shards"
    __table_args__ = (UniqueConstraint("job_id", "index"),)
    kind = "shard"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    first_key: Mapped[int] = mapped_column(Integer)
    stop_key: Mapped[int] = mapped_column(Integer)
    start: Mapped[int] = mapped_column(BigInteger)
    end: Mapped[int] = mapped_column(BigInteger)
    bytes_to_read: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))


class Analysis(Leased, Base):
    """Distances between registered models per component. `request` holds the resolved models
    (id, name, sha256), the base, components and metrics; the report lands in
    `artifacts/analyses/<id>/` when it succeeds."""

    __tablename__ = "analyses"
    kind = "analysis"

    id: Mapped[int] = mapped_column(primary_key=True)
    request: Mapped[dict[str, Any]]
    architecture: Mapped[str | None] = mapped_column(String(32))


class Preview(Leased, Base):
    """Images sampled from models, merge outputs or unmaterialised recipes. `request` holds the
    resolved targets (label, canonical recipe, model name) and the sampling; `result` lists the
    images written to `artifacts/previews/<id>/` once it succeeds."""

    __tablename__ = "previews"
    kind = "preview"

    id: Mapped[int] = mapped_column(primary_key=True)
    request: Mapped[dict[str, Any]]
    result: Mapped[dict[str, Any] | None]


class Study(Base):
    """A selection study: candidates, topics and settings, and its rounds (`StudyRound`). `request`
    holds the candidates (id, name, sha256), the VAE baked into every round, and the preview
    settings and topics every round samples with."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    architecture: Mapped[str | None] = mapped_column(String(32))
    request: Mapped[dict[str, Any]]
    merge_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class StudyRound(Base):
    """One round of a study: its kind, the preview that samples it, the candidate of each grid
    column and, once the user has looked, the picks (candidate indexes)."""

    __tablename__ = "study_rounds"
    __table_args__ = (UniqueConstraint("study_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    preview_id: Mapped[int | None] = mapped_column(ForeignKey("previews.id", ondelete="SET NULL"))
    columns: Mapped[dict[str, Any]]  # {"candidates": [index or null per grid column], "labels": [...]}
    base: Mapped[dict[str, Any] | None]  # the recipe the round varies
    picks: Mapped[dict[str, Any] | None]  # {"candidates": [index, ...]}
    picked_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
