"""Preview routes: submit, list, get (progress and links), the grid and images, cancel, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import FileResponse

from app.bodies import SafeJsonRoute
from app.deps import DbDep, RowId, SettingsDep, WorkStatus, parse_cursor
from app.errors import NotFound
from app.models import MAX_ROW_ID
from app.openapi import errors
from app.schemas import Page, PreviewOut
from app.services import previews
from app.services.previews import PreviewRequest

router = APIRouter(prefix="/previews", tags=["previews"], route_class=SafeJsonRoute)
PNG = {200: {"content": {"image/png": {}}, "description": "a PNG image with A1111 infotext"}}


@router.post("", response_model=PreviewOut, status_code=202, responses=errors(409))
async def submit_preview(body: PreviewRequest, db: DbDep, settings: SettingsDep):
    return previews.view(await db.run_heavy(previews.submit, settings, body))


@router.get("", response_model=Page[PreviewOut], responses=errors(400))
async def list_previews(db: DbDep, status: WorkStatus = None, cursor: str | None = None,
                        limit: Annotated[int, Query(ge=1, le=500)] = 50):
    items = await db.run(previews.list_previews, status=status, before=parse_cursor(cursor), limit=limit)
    return {"items": items, "next": str(items[-1]["id"]) if len(items) == limit else None}


@router.get("/{preview_id}", response_model=PreviewOut)
async def get_preview(preview_id: RowId, db: DbDep):
    return await db.run(previews.get, preview_id)


@router.get("/{preview_id}/grid.png", response_class=FileResponse, responses=PNG)
async def preview_grid(preview_id: RowId, db: DbDep, settings: SettingsDep):
    return FileResponse(await db.run(previews.image, settings, preview_id, None), media_type="image/png")


@router.get("/{preview_id}/images/{index}.png", response_class=FileResponse, responses=PNG)
async def preview_image(preview_id: RowId, index: Annotated[int, Path(ge=0, le=MAX_ROW_ID)], db: DbDep, settings: SettingsDep):
    path = await db.run(previews.image, settings, preview_id, index)
    if path.is_relative_to(settings.tmp_dir):  # a running preview's: it may be moved away at any moment
        try:
            return Response(path.read_bytes(), media_type="image/png", headers={"Cache-Control": "no-store"})
        except FileNotFoundError:
            raise NotFound("the preview has just finished; fetch the image again",
                           details={"id": preview_id, "image": index}) from None
    return FileResponse(path, media_type="image/png")


@router.post("/{preview_id}/cancel", response_model=PreviewOut, status_code=202, responses=errors(409))
async def cancel_preview(preview_id: RowId, db: DbDep):
    return await db.run(previews.cancel, preview_id)


@router.delete("/{preview_id}", response_model=PreviewOut, status_code=202,
               responses={204: {"description": "a finished preview and its images were removed"}, **errors(409)})
async def delete_preview(preview_id: RowId, db: DbDep, settings: SettingsDep):
    row = await db.run(previews.delete, settings, preview_id)
    return Response(status_code=204) if row is None else row
