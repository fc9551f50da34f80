"""Registry routes: register, scan, upload, list (by hash too), get, lineage, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.bodies import SafeJsonRoute
from app.deps import DbDep, ModelStatus, RowId, SearchText, SettingsDep, next_cursor, parse_cursor
from app.openapi import errors
from app.schemas import LineageOut, ModelOut, Page, RegisterModel, ScanOut
from app.services import lineage, registry

HashText = Annotated[str | None, Query(max_length=80, pattern=r"^[^\x00]*$", description=(
    "only the model(s) with this hash, of any kind Civitai shows: AutoV1 or CRC32 (8 hex digits), or a prefix "
    "(10+) of the sha256 (AutoV2), AutoV3 or BLAKE3; case-insensitive; kind:<hex> limits it to one kind. "
    "A hash matching several files is a 409 listing them"))]

router = APIRouter(prefix="/models", tags=["models"], route_class=SafeJsonRoute)


@router.post("", response_model=ModelOut, status_code=201,
             responses={200: {"model": ModelOut, "description": "the path was already registered"}, **errors(409)})
async def register_model(body: RegisterModel, db: DbDep, settings: SettingsDep, response: Response):
    model, created = await db.run(registry.register, settings, body.path, body.name)
    response.status_code = 201 if created else 200
    return model


@router.post("/scan", response_model=ScanOut)
async def scan_models(db: DbDep, settings: SettingsDep):
    return await db.run(registry.scan, settings)


@router.put("/upload/{filename}", response_model=ModelOut, status_code=201, responses=errors(400, 409, 413),
            openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {
                "type": "string", "format": "binary"}}}, "required": True}})
async def upload_model(filename: str, request: Request, db: DbDep, settings: SettingsDep):
    length = request.headers.get("content-length")
    received = await registry.receive_upload(settings, filename, int(length) if length else None,
                                             request.stream())
    return await db.run(registry.register_upload, settings, received)


@router.get("", response_model=Page[ModelOut], responses=errors(400, 409))
async def list_models(db: DbDep, architecture: SearchText = None, name: SearchText = None,
                      status: ModelStatus = None, hash: HashText = None, cursor: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=500)] = 100):
    items = await db.run(registry.list_models, architecture=architecture, name=name, status=status, hash=hash,
                         after=parse_cursor(cursor), limit=limit)
    return {"items": items, "next": next_cursor(items, limit)}


@router.get("/{model_id}", response_model=ModelOut)
async def get_model(model_id: RowId, db: DbDep):
    return await db.run(registry.get_model, model_id)


@router.get("/{model_id}/lineage", response_model=LineageOut, responses=errors(404, 409))
async def model_lineage(model_id: RowId, db: DbDep,
                        depth: Annotated[int, Query(ge=1, le=lineage.MAX_DEPTH)] = lineage.MAX_DEPTH):
    return await db.run(lineage.model_lineage, model_id, depth)


@router.delete("/{model_id}", status_code=204)
async def delete_model(model_id: RowId, db: DbDep, settings: SettingsDep):
    await db.run(registry.delete_model, settings, model_id)
