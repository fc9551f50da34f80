"""Merge jobs: turning a request body into a planned, deduplicated job; listing; cancelling.

A body is a native recipe or A1111 merge metadata. Either way the recipe is planned against the
registry (headers only) before a job exists, so every recipe error is a 422 at submit time,
and the job stores the canonical recipe (every leaf named by sha256) that the worker runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.dispatch import enqueue
from app.errors import NotFound
from app.models import Artifact, Job, MergeShard, Model, utcnow
from app.queue import MERGE_TASK
from app.schemas import ArtifactOut, JobOut
from app.services import leased, registry
from app.services.files import artifact_path
from app.settings import Settings
from merge_engine.a1111 import apply_resolution, convert_a1111, is_a1111_metadata
from merge_engine.errors import RecipeError, ResolveError
from merge_engine.hashing import LEGACY_LENGTH, LEGACY_OFFSET
from merge_engine.importers import import_data, resolve_refs
from merge_engine.methods import LoraLeaf
from merge_engine.plan import ResolvedModel, plan
from merge_engine.recipe import Leaf, ModelLeaf, Recipe, all_leaves, parse_recipe


def recipe_from_body(body: Any) -> Recipe:
    """A native recipe; A1111 merge metadata converted to one (leaves named by sha256 and file
    name); or another tool's recipe (`{"mecha": TEXT}`, `{"supermerger_history": CSV, "row": ID}`,
    supermerger's metadata). An optional top-level `resolve` maps leaf names, paths or sha256
    prefixes to models."""
    if not isinstance(body, Mapping):
        raise RecipeError("the body must be a JSON object: a recipe or A1111 merge metadata")
    body = {k: v for k, v in body.items() if k != "shards"}
    overrides = body.get("resolve") if isinstance(body.get("resolve"), Mapping) else None
    data = {k: v for k, v in body.items() if k != "resolve"} if overrides is not None else body
    if (imported := import_data(data)) is not None:
        if not imported.leaves:  # paths or short hashes, found in the registry by name or sha256
            return resolve_refs(imported.recipe, {str(k): str(v) for k, v in (overrides or {}).items()})
        if not overrides:
            return imported.recipe
        return apply_resolution(imported, {str(k): str(v) for k, v in overrides.items()}, lambda _name: None)[0]
    if not is_a1111_metadata(data):
        return parse_recipe(data)
    conversion = convert_a1111(data)
    if not overrides:
        return conversion.recipe
    recipe, _ = apply_resolution(conversion, {str(k): str(v) for k, v in overrides.items()},
                                 lambda _name: None)
    return recipe


class RegistryResolver:
    """Resolves every leaf of a recipe against the registry up front, so one 422 lists all the
    leaves that cannot be found rather than only the first. With `settings`, a leaf may also be a
    stored merge output (an artifact, by sha256): a preview of a finished merge's variants."""

    def __init__(self, session: Session, recipe: Recipe, settings: Settings | None = None):
        self.resolved: dict[Leaf, ResolvedModel] = {}
        unresolved = []
        for leaf in all_leaves(recipe):
            leaf = leaf.ref if isinstance(leaf, LoraLeaf) else leaf  # the planner resolves a LoRA's reference
            if settings is not None and (stored := _artifact(session, settings, leaf)) is not None:
                self.resolved[leaf] = stored
                continue
            try:
                model = self._model(session, leaf)
            except ResolveError as exc:
                unresolved.append({"leaf": _label(leaf), "reason": exc.message})
                continue
            self.resolved[leaf] = ResolvedModel(Path(model.path), model.name, model.sha256, model.legacy_hash)
        if unresolved:
            names = ", ".join(u["leaf"] for u in unresolved)
            raise ResolveError(f"{len(unresolved)} model(s) not found in the registry: {names}",
                               model=unresolved[0]["leaf"], details={"unresolved": unresolved})

    @staticmethod
    def _model(session: Session, leaf: Leaf):
        if isinstance(leaf, ModelLeaf):
            model = registry.find_leaf(session, leaf.sha256, leaf.name)
            if model is None:
                raise ResolveError("no registered model has this sha256 or file name", model=leaf.label())
        else:
            model = registry.find(session, leaf)
        return registry.require_ready(model, _label(leaf))

    def __call__(self, leaf: Leaf):
        return self.resolved[leaf]


def _artifact(session: Session, settings: Settings, leaf: Leaf) -> ResolvedModel | None:
    """A stored merge output with the leaf's sha256, unless a registered model has it. Artifacts
    are content-addressed and written once, so their sha256 is known; the legacy hash is 64 KiB."""
    if not isinstance(leaf, ModelLeaf) or leaf.sha256 is None:
        return None
    if session.scalar(select(Model.id).where(Model.sha256 == leaf.sha256, Model.status == "ready").limit(1)):
        return None
    artifact = session.scalar(select(Artifact).where(Artifact.sha256 == leaf.sha256))
    path = artifact_path(settings, leaf.sha256) if artifact is not None else None
    if path is None or not path.is_file():
        return None
    with path.open("rb") as f:
        f.seek(LEGACY_OFFSET)
        legacy = hashlib.sha256(f.read(LEGACY_LENGTH)).hexdigest()[:8]
    return ResolvedModel(path, artifact.filename, artifact.sha256, legacy, artifact.size)


def _label(leaf: Leaf) -> str:
    return leaf.label() if isinstance(leaf, ModelLeaf) else leaf


def plan_body(session: Session, body: Any, settings: Settings | None = None):
    """The engine's plan for a request body (with `settings`, its leaves may be merge outputs);
    the caller closes it."""
    recipe = recipe_from_body(body)
    return plan(recipe, RegistryResolver(session, recipe, settings))


def dry_run(session: Session, body: Any) -> dict[str, Any]:
    planned = plan_body(session, body)
    try:
        return {**planned.to_dict(), "recipe": planned.canonical_recipe.model_dump(mode="json")}
    finally:
        planned.close()


MAX_SHARDS = 1024


def requested_shards(body: Any) -> int | None:
    """The body's optional `"shards": k`: split this merge into k shards across workers (1: one
    task); the same recipe's bytes whatever k."""
    value = body.get("shards") if isinstance(body, Mapping) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHARDS:
        raise RecipeError(f"shards must be a whole number from 1 to {MAX_SHARDS}", details={"shards": value})
    return value


def submit(session: Session, body: Any) -> tuple[Job, bool]:
    """(job, created). A recipe whose job is queued, running or succeeded answers that job;
    the unique live_recipe_hash makes that hold under concurrent identical submissions."""
    shards = requested_shards(body)
    planned = plan_body(session, body)
    planned.close()
    existing = _live_job(session, planned.recipe_hash)
    if existing is not None:
        return existing, False
    job = Job(status="queued", name=planned.recipe.name, recipe=planned.canonical_recipe.model_dump(mode="json"),
              recipe_hash=planned.recipe_hash, live_recipe_hash=planned.recipe_hash,
              architecture=planned.architecture, output_size=planned.output_size, shards=shards,
              cancel_requested=False, attempts=0, dispatched_at=utcnow(),
              artifact=None)  # loaded, so the job reads fine after its session closes
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        existing = _live_job(session, planned.recipe_hash)
        if existing is None:
            raise
        return existing, False
    enqueue(session, MERGE_TASK, job.id)
    return job, True


def _live_job(session: Session, recipe_hash: str) -> Job | None:
    return session.scalar(select(Job).where(Job.live_recipe_hash == recipe_hash))


def get_job(session: Session, job_id: int) -> Job:
    return leased.get_row(session, Job, job_id)


# GET /merges/{id}, the status poll: one indexed SELECT of JobOut's columns (the artifact's by a
# left join) on a plain connection: no session, no ORM objects. JobOut still shapes the JSON, so
# the bytes are those the response model makes of `get_job`'s row.
_JOB_FIELDS = tuple(name for name in JobOut.model_fields if name != "artifact")
_ARTIFACT_FIELDS = tuple(ArtifactOut.model_fields)
_JOBS, _ARTIFACTS = Job.__table__, Artifact.__table__
_JOB_BY_ID = (
    select(*(_JOBS.c[name] for name in _JOB_FIELDS), *(_ARTIFACTS.c[name] for name in _ARTIFACT_FIELDS))
    .select_from(_JOBS.outerjoin(_ARTIFACTS, _ARTIFACTS.c.id == _JOBS.c.artifact_id))
    .where(_JOBS.c.id == bindparam("job_id"))
)


def job_json(connection: Connection, job_id: int) -> bytes:
    """`JobOut`'s JSON for one job, or NotFound as from `get_job`."""
    row = connection.execute(_JOB_BY_ID, {"job_id": job_id}).first()
    if row is None:
        raise NotFound("no such merge job", details={"id": job_id})
    split = len(_JOB_FIELDS)
    job = dict(zip(_JOB_FIELDS, row[:split], strict=True))
    artifact = row[split:]
    job["artifact"] = dict(zip(_ARTIFACT_FIELDS, artifact, strict=True)) if artifact[0] is not None else None
    return JobOut.model_validate(job).model_dump_json()


def list_jobs(session: Session, *, status: str | None = None, before: int | None = None,
              limit: int = 50) -> list[Job]:
    return leased.list_rows(session, Job, status=status, before=before, limit=limit)


def cancel(session: Session, job_id: int) -> Job:
    """See `leased.cancel`; a cancelled job stops deduplicating its recipe, and its shards
    stop too (queued ones at once, running ones at their next heartbeat)."""
    job = leased.cancel(session, Job, job_id)
    cancel_shards(session, job_id)
    return job


def cancel_shards(session: Session, job_id: int) -> None:
    """A sharded job's queued shards end cancelled; running ones stop at their next heartbeat."""
    session.execute(update(MergeShard).where(MergeShard.job_id == job_id, MergeShard.status == "queued")
                    .values(status="cancelled", cancel_requested=True, finished_at=utcnow()))
    session.execute(update(MergeShard).where(MergeShard.job_id == job_id, MergeShard.status == "running")
                    .values(cancel_requested=True))
