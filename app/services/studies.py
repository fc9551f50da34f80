"""Selection studies: candidates, topics and settings, and rounds of previews the user picks from;
the final recipe becomes a merge job whose output records the study (merge_engine/study.py has
the rounds themselves).

A round is a preview on the preview queue (leased like any): creating one plans its variants
against the registry and queues it in the same transaction. Picks are recorded per round, and
only while no later round was built from the picks before them.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import Job, Preview, Study, StudyRound, utcnow
from app.services import merges, previews, registry
from app.services.previews import PreviewRequest, PreviewSettings, Ref, Topic
from app.settings import Settings
from merge_engine.errors import OptionsError
from merge_engine.preview.params import check_topics
from merge_engine.study import (
    ROUND_KINDS,
    Candidate,
    Selection,
    build_round,
    check_candidates,
    final_recipe,
    provenance,
    resolve_picks,
)

SETTING_FIELDS = tuple(PreviewSettings.model_fields)


class StudyRequest(PreviewSettings):
    name: str | None = Field(default=None, max_length=200)
    candidates: list[Ref] = Field(min_length=2, max_length=256, description="the models to choose from: registry "
                                                                             "ids, names or sha256:<hex>")
    vae: Ref | None = Field(default=None, description="a model whose VAE is baked into every round and the final "
                                                      "recipe (the WebUI's baked VAE)")
    topics: list[Topic] = Field(default=[], max_length=64, description="prompt sets or A1111 payloads, each its "
                                                                       "own grid rows; the fields beside apply to all")


def create(session: Session, request: StudyRequest) -> Study:
    models = registry.find_ready(session, [str(c) for c in request.candidates])
    candidates = [{"id": m.id, "name": m.name, "sha256": m.sha256} for m in models]
    check_candidates(_candidates(candidates))
    architectures = sorted({m.architecture or "unknown" for m in models})
    if len(architectures) > 1:
        by = {a: [m.name for m in models if (m.architecture or "unknown") == a] for a in architectures}
        raise OptionsError("the candidates are of different architectures: " +
                           "; ".join(f"{a}: {', '.join(names)}" for a, names in by.items()))
    vae = None
    if request.vae is not None:
        (model,) = registry.find_ready(session, [str(request.vae)])
        if "vae" not in (model.components or {}):
            raise OptionsError(f"model {model.name!r} has no VAE to bake in")
        vae = {"id": model.id, "name": model.name, "sha256": model.sha256}
    settings = request.model_dump(mode="json", exclude_unset=True, include=set(SETTING_FIELDS) | {"topics"})
    topics, _ = PreviewRequest.model_validate({**settings, "targets": [1]}).samplings()
    check_topics(topics, len(candidates) + 1)  # the settings, checked now: a raw round has N + 1 columns
    study = Study(name=request.name, architecture=architectures[0],
                  request={"candidates": candidates, "vae": vae, "settings": settings})
    session.add(study)
    session.flush()
    return study


def get_study(session: Session, study_id: int) -> Study:
    study = session.get(Study, study_id)
    if study is None:
        raise NotFound("no such study", details={"id": study_id})
    return study


def list_studies(session: Session, *, before: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
    query = select(Study).order_by(Study.id.desc()).limit(limit)
    if before is not None:
        query = query.where(Study.id < before)
    return [view(session, s) for s in session.scalars(query)]


def _candidates(rows: list[dict[str, Any]]) -> list[Candidate]:
    return [Candidate(r["name"], {"sha256": r["sha256"], "name": r["name"]}, r["sha256"]) for r in rows]


def _rounds(session: Session, study: Study) -> list[StudyRound]:
    return list(session.scalars(select(StudyRound).where(StudyRound.study_id == study.id)
                                .order_by(StudyRound.number)))


def selection(study: Study, rounds: list[StudyRound]) -> Selection:
    """The picks of the latest round of each kind that has them."""
    picks: dict[str, list[int]] = {}
    for r in rounds:
        if r.picks is not None:
            picks[r.kind] = list(r.picks["candidates"])
    return Selection(_candidates(study.request["candidates"]), picks)


def _vae_leaf(study: Study) -> dict[str, Any] | None:
    vae = study.request.get("vae")
    return {"sha256": vae["sha256"], "name": vae["name"]} if vae else None


def start_round(session: Session, settings: Settings, study_id: int, kind: str) -> StudyRound:
    """Build the round `kind` from the picks so far and queue its preview."""
    study = get_study(session, study_id)
    rounds = _rounds(session, study)
    if kind not in ROUND_KINDS:
        raise OptionsError(f"unknown round kind {kind!r}; choose from {', '.join(ROUND_KINDS)}")
    spec = build_round(kind, selection(study, rounds), study.architecture or "", _vae_leaf(study))
    ids = [c["id"] for c in study.request["candidates"]]
    body: dict[str, Any] = dict(study.request["settings"])
    if spec.sweep is not None:
        sweep = {**spec.sweep, "base": {"recipe": spec.sweep["base"]}}
        if "candidates" in sweep:
            sweep["candidates"] = [ids[i] for i in sweep["candidates"]]
        body["sweep"] = sweep
    else:
        body["targets"] = [{"recipe": t["recipe"], "label": t["label"]} for t in spec.targets]
    preview = previews.submit(session, settings, PreviewRequest.model_validate(body))
    labels = [t["label"] for t in preview.request["targets"]]
    number = (session.scalar(select(func.max(StudyRound.number)).where(StudyRound.study_id == study.id)) or 0) + 1
    row = StudyRound(study_id=study.id, number=number, kind=kind, preview_id=preview.id,
                     columns={"candidates": spec.columns, "labels": labels}, base=spec.base)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        raise Conflict("another round of this study was started at the same moment; try again",
                       details={"study": study.id}) from None
    study.updated_at = utcnow()
    return row


def get_round(session: Session, study_id: int, number: int) -> StudyRound:
    row = session.scalar(select(StudyRound).where(StudyRound.study_id == study_id, StudyRound.number == number))
    if row is None:
        get_study(session, study_id)
        raise NotFound(f"the study has no round {number}", details={"study": study_id, "round": number})
    return row


def record_picks(session: Session, study_id: int, number: int, picks: list[Any]) -> StudyRound:
    study = get_study(session, study_id)
    row = get_round(session, study_id, number)
    later = session.scalar(select(func.count()).select_from(StudyRound).where(
        StudyRound.study_id == study_id, StudyRound.number > number))
    if later:
        raise Conflict(f"round {number + 1} was built from the picks before it; start a new {row.kind} round to "
                       "pick again", details={"study": study_id, "round": number})
    preview = session.get(Preview, row.preview_id) if row.preview_id is not None else None
    if preview is None or preview.status != "succeeded":
        state = preview.status if preview is not None else "deleted"
        raise Conflict(f"round {number}'s preview is {state}; pick once its grid exists",
                       details={"study": study_id, "round": number, "preview": row.preview_id})
    candidates = _candidates(study.request["candidates"])
    ids = [c["id"] for c in study.request["candidates"]]
    chosen = resolve_picks(row.kind, picks, row.columns["candidates"], candidates, ids)
    row.picks = {"candidates": chosen}
    row.picked_at = utcnow()
    study.updated_at = utcnow()
    return row


def merge(session: Session, study_id: int) -> tuple[Job, bool]:
    """The final recipe of the picks so far as a merge job; its output's metadata holds the study."""
    study = get_study(session, study_id)
    rounds = _rounds(session, study)
    chosen = selection(study, rounds)
    recipe = final_recipe(chosen, study.architecture or "", _vae_leaf(study), _name(study.name))
    topics, _ = PreviewRequest.model_validate({**study.request["settings"], "targets": [1]}).samplings()
    record = provenance({"study": study.id, "name": study.name, "vae": (study.request.get("vae") or {}).get("name"),
                         "topics": [{"prompts": list(t.prompts), "seeds": list(t.seeds)} for t in topics]},
                        [_round_record(study, r) for r in rounds], chosen)
    recipe["output"] = {"metadata": {"sdmerge_study": record}}
    job, created = merges.submit(session, recipe)
    study.merge_job_id = job.id
    study.updated_at = utcnow()
    return job, created


def _name(name: str | None) -> str | None:
    if not name:
        return None
    cleaned = "".join("_" if c in "/\\\0" else c for c in name).strip()
    return cleaned or None


def _round_record(study: Study, r: StudyRound) -> dict[str, Any]:
    names = [c["name"] for c in study.request["candidates"]]
    return {"number": r.number, "kind": r.kind, "preview": r.preview_id, "columns": r.columns["labels"],
            "picks": [names[i] for i in r.picks["candidates"]] if r.picks is not None else None}


def view(session: Session, study: Study) -> dict[str, Any]:
    rounds = _rounds(session, study)
    chosen = selection(study, rounds)
    names = [c["name"] for c in study.request["candidates"]]
    try:
        final = final_recipe(chosen, study.architecture or "", _vae_leaf(study), _name(study.name))
    except OptionsError:
        final = None
    return {
        "id": study.id, "name": study.name, "architecture": study.architecture,
        "candidates": study.request["candidates"], "vae": study.request.get("vae"),
        "settings": study.request["settings"],
        "rounds": [round_view(session, study, r) for r in rounds],
        "selection": {"kept": [names[i] for i in chosen.kept()],
                      "text_encoders": [names[i] for i in chosen.text_encoders()],
                      "unets": [names[i] for i in chosen.unets()],
                      "left_out": [names[i] for i in chosen.picks.get("leave_one_out", [])]},
        "final_recipe": final, "merge": study.merge_job_id,
        "created_at": study.created_at, "updated_at": study.updated_at,
    }


def round_view(session: Session, study: Study, r: StudyRound) -> dict[str, Any]:
    names = [c["name"] for c in study.request["candidates"]]
    preview = session.get(Preview, r.preview_id) if r.preview_id is not None else None
    shown = previews.view(preview) if preview is not None else None
    return {
        "study": study.id, "number": r.number, "kind": r.kind, "preview": r.preview_id,
        "status": preview.status if preview is not None else "deleted",
        "grid": shown["grid"] if shown else None,
        "columns": [{"label": label, "candidate": names[i] if i is not None else None}
                    for label, i in zip(r.columns["labels"], r.columns["candidates"], strict=True)],
        "base": r.base,
        "picks": [names[i] for i in r.picks["candidates"]] if r.picks is not None else None,
        "picked_at": r.picked_at, "created_at": r.created_at,
    }
