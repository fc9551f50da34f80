"""Artifact routes: resumable downloads (Range, ETag, HEAD), header metadata, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from app.bodies import SafeJsonRoute
from app.deps import DbDep, RowId, SettingsDep
from app.openapi import errors
from app.schemas import ArtifactOut
from app.services import artifacts

router = APIRouter(prefix="/artifacts", tags=["artifacts"], route_class=SafeJsonRoute)


DOWNLOAD = {200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                  "description": "the file"},
            206: {"content": {"application/octet-stream": {}, "multipart/byteranges": {}},
                  "description": "a byte range"},
            304: {"description": "not modified (If-None-Match: the ETag, which is the sha256)"},
            416: {"content": {"text/plain": {}}, "description": "range not satisfiable"}}


@router.get("/{artifact_id}", response_class=FileResponse, responses=DOWNLOAD)
@router.head("/{artifact_id}", response_class=FileResponse, responses=DOWNLOAD, operation_id="head_artifact")
async def download_artifact(artifact_id: RowId, request: Request, db: DbDep, settings: SettingsDep):
    artifact = await db.run(artifacts.get_artifact, artifact_id)
    path = artifacts.artifact_file(settings, artifact)
    etag = f'"{artifact.sha256}"'  # the content hash: a strong validator that never goes stale
    if etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers={"ETag": etag})
    # Starlette's FileResponse does Range (206, multipart, 416), If-Range and HEAD.
    return FileResponse(path, filename=artifact.filename, media_type="application/octet-stream",
                        headers={"ETag": etag})


@router.get("/{artifact_id}/info", response_model=ArtifactOut)
async def artifact_info(artifact_id: RowId, db: DbDep):
    return await db.run(artifacts.get_artifact, artifact_id)


@router.get("/{artifact_id}/metadata")
async def artifact_metadata(artifact_id: RowId, db: DbDep) -> dict[str, Any]:
    artifact = await db.run(artifacts.get_artifact, artifact_id)
    return artifact.header_metadata or {}


@router.delete("/{artifact_id}", status_code=204, responses=errors(409))
async def delete_artifact(artifact_id: RowId, db: DbDep, settings: SettingsDep):
    await db.run(artifacts.delete_artifact, settings, artifact_id)
