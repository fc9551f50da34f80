"""Merge routes: submit (native recipe, A1111 metadata or an imported recipe), dry-run plan, list, get, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response

from app.bodies import SafeJsonRoute
from app.deps import DbDep, RowId, WorkStatus, next_cursor, parse_cursor
from app.openapi import RECIPE_BODY, errors
from app.schemas import JobOut, Page
from app.services import merges

router = APIRouter(prefix="/merges", tags=["merges"], route_class=SafeJsonRoute)

# Validated as a recipe by the engine (parse_recipe), in a worker thread; documented by its schema.
RecipeBody = Annotated[dict[str, Any], Body(
    description="a native recipe (see the engine's recipe schema) with models named by registry "
                "id, name or `sha256:<hex>`; or A1111 merge metadata (`{\"__metadata__\": {...}}`), "
                "optionally with `\"resolve\": {\"<leaf name or sha256 prefix>\": \"<model ref>\"}`; or another "
                "tool's recipe: `{\"mecha\": \"<.mecha text>\"}`, `{\"supermerger_history\": \"<csv>\", \"row\": ID}`",
)]
RECIPE = {"requestBody": RECIPE_BODY}


@router.post("", response_model=JobOut, status_code=202, openapi_extra=RECIPE,
             responses={200: {"model": JobOut, "description": "the same recipe's live or finished job"},
                        **errors(409)})
async def submit_merge(body: RecipeBody, db: DbDep, response: Response):
    job, created = await db.run_heavy(merges.submit, body)
    response.status_code = 202 if created else 200
    return job


@router.post("/plan", openapi_extra=RECIPE, responses=errors(409))
async def plan_merge(body: RecipeBody, db: DbDep) -> dict[str, Any]:
    return await db.run_heavy(merges.dry_run, body)


@router.get("", response_model=Page[JobOut], responses=errors(400))
async def list_merges(db: DbDep, status: WorkStatus = None, cursor: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=500)] = 50):
    items = await db.run(merges.list_jobs, status=status, before=parse_cursor(cursor), limit=limit)
    return {"items": items, "next": next_cursor(items, limit)}


@router.get("/{job_id}", response_model=JobOut)
async def get_merge(job_id: RowId, db: DbDep):
    # The status poll, the hottest request: one read, JSON made once (see `merges.job_json`).
    return Response(await db.read(merges.job_json, job_id), media_type="application/json")


@router.post("/{job_id}/cancel", response_model=JobOut, status_code=202, responses=errors(409))
async def cancel_merge(job_id: RowId, db: DbDep):
    return await db.run(merges.cancel, job_id)
