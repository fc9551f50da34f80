"""Previews: images sampled from models, finished merges or recipes, as leased work on the
`preview` queue; the images and the grid are served from `artifacts/previews/<id>/`.

Every target becomes, at submit time, a label and a canonical recipe whose leaves are named by
sha256 (a model: that file alone; a merge: its artifact; a recipe: planned against the registry
like a merge). The sampling parameters are checked by the engine's own torch-free `Sampling`.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from app.dispatch import enqueue
from app.errors import Conflict, InvalidPreview, NotFound
from app.models import MAX_ROW_ID, Job, Model, Preview, utcnow
from app.queue import PREVIEW_TASK
from app.services import leased, merges, registry
from app.services.files import result_dir
from app.settings import Settings
from merge_engine.preview.params import PREDICTION_TYPES, SAMPLERS, Sampling

Ref = str | int
DEFAULTS = {f.name: f.default for f in fields(Sampling) if f.name != "extra"}
SAMPLING_FIELDS = tuple(DEFAULTS) + ("prompts",)


class PreviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[Ref | dict[str, Any]] = Field(
        default=[], description="each a model reference (registry id, name or `sha256:<hex>`), "
                                "`{\"merge\": JOB_ID}` (a succeeded merge's output) or `{\"recipe\": {...}}`")
    base: Ref | None = Field(default=None, description="text-encoder sweep: the model to take everything else from")
    swap_text_encoder_from: list[Ref] = Field(
        default=[], description="text-encoder sweep: one target per model, `base` with this model's text_encoder")
    prompts: list[str] = Field(description="one column of images per prompt and seed")
    negative_prompt: str = DEFAULTS["negative_prompt"]
    seeds: list[int] = Field(default=list(DEFAULTS["seeds"]))
    steps: int = DEFAULTS["steps"]
    cfg_scale: float = DEFAULTS["cfg_scale"]
    sampler: str = Field(default=DEFAULTS["sampler"], description=" | ".join(SAMPLERS))
    width: int = Field(default=DEFAULTS["width"], description="a multiple of 8")
    height: int = Field(default=DEFAULTS["height"], description="a multiple of 8")
    prediction_type: str | None = Field(
        default=None, description=f"{' | '.join(PREDICTION_TYPES)}; default: the architecture's")

    def sampling(self) -> Sampling:
        return Sampling(**{name: getattr(self, name) for name in SAMPLING_FIELDS if name in type(self).model_fields})


def submit(session: Session, request: PreviewRequest) -> Preview:
    sampling = request.sampling()
    targets = _targets(session, request)
    sampling.validate(targets=len(targets))
    total = len(targets) * sampling.images_per_target()
    data = {k: v for k, v in asdict(sampling).items() if k != "extra"}
    preview = Preview(status="queued", progress={"images_done": 0, "images_total": total}, cancel_requested=False,
                      attempts=0, dispatched_at=utcnow(), request={"targets": targets, "sampling": data})
    session.add(preview)
    session.flush()
    enqueue(session, PREVIEW_TASK, preview.id)
    return preview


def _targets(session: Session, request: PreviewRequest) -> list[dict[str, Any]]:
    """Each target as {label, recipe (canonical), model_name, model_hash, source}, in order:
    `targets` first, then the text-encoder sweep."""
    if request.base is None and request.swap_text_encoder_from:
        raise InvalidPreview("swap_text_encoder_from needs a base model to swap into")
    if request.base is not None and not request.swap_text_encoder_from:
        raise InvalidPreview("base is for a text-encoder sweep: give swap_text_encoder_from too")
    if not request.targets and request.base is None:
        raise InvalidPreview("give at least one target, or a base and swap_text_encoder_from")
    refs = [str(t) for t in request.targets if not isinstance(t, dict)]
    sweep = [str(request.base), *map(str, request.swap_text_encoder_from)] if request.base is not None else []
    models = dict(zip(refs + sweep, registry.find_ready(session, refs + sweep), strict=True))
    out, recipes = [], 0
    for position, target in enumerate(request.targets):
        if not isinstance(target, dict):
            out.append(_model_target(models[str(target)]))
        elif set(target) == {"merge"}:
            out.append(_merge_target(session, target["merge"], position))
        elif set(target) == {"recipe"}:
            recipes += 1
            out.append(_recipe_target(session, target["recipe"], f"recipe {recipes}", {"recipe": recipes}))
        else:
            raise InvalidPreview(f"targets[{position}] must be a model reference, {{\"merge\": JOB_ID}} or "
                                 f"{{\"recipe\": {{...}}}}; got keys {sorted(target)}", details={"target": position})
    if sweep:
        base = models[sweep[0]]
        for ref in sweep[1:]:
            candidate = models[ref]
            recipe = {"merge": f"sha256:{base.sha256}", "components": {"text_encoder": f"sha256:{candidate.sha256}"}}
            target = _recipe_target(session, recipe, f"TE: {candidate.name}",
                                    {"base": base.id, "text_encoder": candidate.id})
            target["model_name"] = f"{base.name} + TE {candidate.name}"
            out.append(target)
    return out


def _leaf(sha256: str, name: str) -> dict[str, Any]:
    return {"sha256": sha256, "name": name}


def _model_target(model: Model) -> dict[str, Any]:
    return {"label": model.name, "recipe": {"merge": _leaf(model.sha256, model.name)},
            "model_name": model.name, "model_hash": None, "source": {"model": model.id}}


def _merge_target(session: Session, job_id: Any, position: int) -> dict[str, Any]:
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 1 <= job_id <= MAX_ROW_ID:
        raise InvalidPreview(f"targets[{position}]: merge must be a merge job id (a positive integer)",
                             details={"target": position})
    job = session.get(Job, job_id)
    if job is None:
        raise InvalidPreview(f"targets[{position}]: no merge job #{job_id}", details={"target": position})
    if job.status != "succeeded" or job.artifact is None:
        state = job.status if job.status != "succeeded" else "succeeded, but its output was deleted"
        raise Conflict(f"merge #{job_id} is {state}; preview it once it has an output",
                       details={"target": position, "merge": job_id, "status": job.status})
    label = job.name or f"merge #{job_id}"
    return {"label": label, "recipe": {"merge": _leaf(job.artifact.sha256, job.artifact.filename)},
            "model_name": label, "model_hash": None, "source": {"merge": job_id}}


def _recipe_target(session: Session, body: Any, fallback: str, source: dict[str, Any]) -> dict[str, Any]:
    planned = merges.plan_body(session, body)
    planned.close()
    label = planned.recipe.name or fallback
    return {"label": label, "recipe": planned.canonical_recipe.model_dump(mode="json"),
            "model_name": label, "model_hash": None, "source": source}


def get(session: Session, preview_id: int) -> dict[str, Any]:
    return view(leased.get_row(session, Preview, preview_id))


def list_previews(session: Session, **page: Any) -> list[dict[str, Any]]:
    return [view(row) for row in leased.list_rows(session, Preview, **page)]


def cancel(session: Session, preview_id: int) -> dict[str, Any]:
    return view(leased.cancel(session, Preview, preview_id))


def delete(session: Session, settings: Settings, preview_id: int) -> dict[str, Any] | None:
    """Cancels a queued or running preview; forgets a finished one and removes its images."""
    row = leased.delete(session, settings, Preview, preview_id)
    return None if row is None else view(row)


def view(row: Preview) -> dict[str, Any]:
    out = {name: getattr(row, name) for name in (
        "id", "status", "progress", "error", "cancel_requested", "attempts", "created_at", "started_at",
        "finished_at")}
    out["targets"] = [{k: t[k] for k in ("label", "model_name", "source", "recipe")} for t in row.request["targets"]]
    out["sampling"] = row.request["sampling"]
    out["grid"], out["images"] = None, []
    if row.status == "succeeded" and row.result:
        base = f"/previews/{row.id}"
        out["grid"] = f"{base}/grid.png" if row.result["grid"] else None
        out["images"] = [{"url": f"{base}/images/{image['index']}.png",
                          **{k: image[k] for k in ("index", "target_index", "prompt_index", "seed", "infotext")}}
                         for image in row.result["images"]]
        out["seconds"] = row.result.get("seconds")
    return out


def image(session: Session, settings: Settings, preview_id: int, index: int | None) -> Path:
    """The PNG of image `index`, or of the grid (None), of a succeeded preview."""
    row = leased.get_row(session, Preview, preview_id)
    if row.status != "succeeded" or not row.result:
        raise NotFound(f"the preview is {row.status}; its images exist once it has succeeded",
                       details={"id": preview_id, "status": row.status})
    if index is None:
        if not row.result["grid"]:
            raise NotFound("a preview of one image has no grid; fetch images/0.png", details={"id": preview_id})
        name = row.result["grid_file"]
    else:
        files = {image["index"]: image["file"] for image in row.result["images"]}
        if index not in files:
            raise NotFound(f"the preview has images 0 to {len(files) - 1}", details={"id": preview_id, "image": index})
        name = files[index]
    path = result_dir(settings, Preview.kind, preview_id) / name
    if not path.is_file():
        raise NotFound("the image is missing from the store", details={"id": preview_id, "file": name})
    return path
