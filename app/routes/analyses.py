"""Analysis routes: submit, list, get (with the report), pictures, cancel, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse

from app.bodies import SafeJsonRoute
from app.deps import DbDep, RowId, SettingsDep, WorkStatus, parse_cursor
from app.openapi import errors
from app.schemas import AnalysisOut, Page
from app.services import analyses
from app.services.analyses import AnalysisRequest

router = APIRouter(prefix="/analyses", tags=["analyses"], route_class=SafeJsonRoute)
PNG = {200: {"content": {"image/png": {}}, "description": "a PNG image"}}


@router.post("", response_model=AnalysisOut, status_code=202, responses=errors(409))
async def submit_analysis(body: AnalysisRequest, db: DbDep, settings: SettingsDep):
    row = await db.run_heavy(analyses.submit, body)
    return analyses.view(settings, row, with_result=False)


@router.get("", response_model=Page[AnalysisOut], responses=errors(400))
async def list_analyses(db: DbDep, settings: SettingsDep, status: WorkStatus = None, cursor: str | None = None,
                        limit: Annotated[int, Query(ge=1, le=500)] = 50):
    items = await db.run(analyses.list_analyses, settings, status=status, before=parse_cursor(cursor), limit=limit)
    return {"items": items, "next": str(items[-1]["id"]) if len(items) == limit else None}


@router.get("/{analysis_id}", response_model=AnalysisOut)
async def get_analysis(analysis_id: RowId, db: DbDep, settings: SettingsDep):
    return await db.run(analyses.get, settings, analysis_id)


@router.get("/{analysis_id}/heatmap-{component}.png", response_class=FileResponse, responses=PNG)
async def analysis_heatmap(analysis_id: RowId, component: str, db: DbDep, settings: SettingsDep,
                           metric: Literal["l2", "cosine"] | None = None):
    path = await db.run(analyses.picture, settings, analysis_id, "heatmap", component, metric)
    return FileResponse(path, media_type="image/png")


@router.get("/{analysis_id}/map-{component}.png", response_class=FileResponse, responses=PNG)
async def analysis_map(analysis_id: RowId, component: str, db: DbDep, settings: SettingsDep):
    path = await db.run(analyses.picture, settings, analysis_id, "map", component)
    return FileResponse(path, media_type="image/png")


@router.post("/{analysis_id}/cancel", response_model=AnalysisOut, status_code=202, responses=errors(409))
async def cancel_analysis(analysis_id: RowId, db: DbDep, settings: SettingsDep):
    return await db.run(analyses.cancel, settings, analysis_id)


@router.delete("/{analysis_id}", response_model=AnalysisOut, status_code=202,
               responses={204: {"description": "a finished analysis and its report were removed"}, **errors(409)})
async def delete_analysis(analysis_id: RowId, db: DbDep, settings: SettingsDep):
    row = await db.run(analyses.delete, settings, analysis_id)
    return Response(status_code=204) if row is None else row
