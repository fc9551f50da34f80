"""Study routes: create, list, get; start a round (a preview), record its picks; merge the final recipe."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from app.bodies import SafeJsonRoute
from app.deps import DbDep, RowId, SettingsDep, parse_cursor
from app.openapi import errors
from app.schemas import JobOut, Page, PicksRequest, RoundRequest, StudyOut, StudyRoundOut
from app.services import studies
from app.services.studies import StudyRequest

router = APIRouter(prefix="/studies", tags=["studies"], route_class=SafeJsonRoute)
RoundNumber = Annotated[int, Path(ge=1, le=1_000_000)]


@router.post("", response_model=StudyOut, status_code=201, responses=errors(409))
async def create_study(body: StudyRequest, db: DbDep):
    def create(session):
        return studies.view(session, studies.create(session, body))

    return await db.run_heavy(create)


@router.get("", response_model=Page[StudyOut], responses=errors(400))
async def list_studies(db: DbDep, cursor: str | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50):
    items = await db.run(studies.list_studies, before=parse_cursor(cursor), limit=limit)
    return {"items": items, "next": str(items[-1]["id"]) if len(items) == limit else None}


@router.get("/{study_id}", response_model=StudyOut)
async def get_study(study_id: RowId, db: DbDep):
    return await db.run(lambda session: studies.view(session, studies.get_study(session, study_id)))


@router.post("/{study_id}/rounds", response_model=StudyRoundOut, status_code=202, responses=errors(409))
async def start_round(study_id: RowId, body: RoundRequest, db: DbDep, settings: SettingsDep):
    def start(session):
        row = studies.start_round(session, settings, study_id, body.kind)
        return studies.round_view(session, studies.get_study(session, study_id), row)

    return await db.run_heavy(start)


@router.get("/{study_id}/rounds/{number}", response_model=StudyRoundOut)
async def get_round(study_id: RowId, number: RoundNumber, db: DbDep):
    def get(session):
        return studies.round_view(session, studies.get_study(session, study_id),
                                  studies.get_round(session, study_id, number))

    return await db.run(get)


@router.post("/{study_id}/rounds/{number}/picks", response_model=StudyRoundOut, responses=errors(409))
async def record_picks(study_id: RowId, number: RoundNumber, body: PicksRequest, db: DbDep):
    def pick(session):
        row = studies.record_picks(session, study_id, number, body.picks)
        return studies.round_view(session, studies.get_study(session, study_id), row)

    return await db.run(pick)


@router.post("/{study_id}/merge", response_model=JobOut, status_code=202,
             responses={200: {"model": JobOut, "description": "the same recipe's live or finished job"},
                        **errors(409)})
async def merge_study(study_id: RowId, db: DbDep, response: Response):
    job, created = await db.run_heavy(studies.merge, study_id)
    response.status_code = 202 if created else 200
    return job
