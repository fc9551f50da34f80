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
from merge_engine.errors import ResolveError
from merge_engine.preview.a1111_settings import from_infotext, from_txt2img_payload
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
    prompts: list[str] = Field(default=[], description="one row of images per prompt and seed (required unless "
                                                       "`a1111` or `infotext` gives the prompt)")
    negative_prompt: str = DEFAULTS["negative_prompt"]
    seeds: list[int] = Field(default=list(DEFAULTS["seeds"]))
    steps: int = DEFAULTS["steps"]
    cfg_scale: float = DEFAULTS["cfg_scale"]
    sampler: str = Field(default=DEFAULTS["sampler"], description=" | ".join(SAMPLERS))
    width: int = Field(default=DEFAULTS["width"], description="a multiple of 8")
    height: int = Field(default=DEFAULTS["height"], description="a multiple of 8")
    prediction_type: str | None = Field(
        default=None, description=f"{' | '.join(PREDICTION_TYPES)}; default: the architecture's")
    clip_skip: int = Field(default=1, description="the WebUI's CLIP_stop_at_last_layers")
    hires: dict[str, Any] | None = Field(
        default=None, description="hires fix: upscaler (Latent, Latent (antialiased), Latent (bicubic), "
                                  "Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact), Lanczos, "
                                  "Nearest), scale or resize_x/resize_y, second_pass_steps, denoising_strength")
    freeu: dict[str, Any] | None = Field(
        default=None, description="FreeU as sd-webui-freeu: stages (3 x {backbone_factor, skip_factor, "
                                  "backbone_offset, backbone_width, skip_cutoff, skip_high_end_factor}), "
                                  "start_ratio, stop_ratio, transition_smoothness, version (1 or 2)")
    dynamic_thresholding: dict[str, Any] | None = Field(
        default=None, description="sd-dynamic-thresholding: mimic_scale, threshold_percentile, mimic_mode, "
                                  "mimic_scale_min, cfg_mode, cfg_scale_min, sched_val, separate_feature_channels, "
                                  "scaling_startpoint (MEAN, ZERO), variability_measure (AD, STD), interpolate_phi")
    vae: Ref | None = Field(default=None, description="decode every image with this model's VAE (the WebUI's sd_vae)")
    a1111: dict[str, Any] | None = Field(
        default=None, description="an A1111 txt2img API body (what /sdapi/v1/txt2img takes): its settings, prompt "
                                  "and seeds; fields given beside it here override it")
    infotext: str | None = Field(default=None, description="a pasted A1111 infotext; as `a1111`")

    def sampling(self) -> tuple[Sampling, str | None]:
        """The sampling, and the VAE file name an imported payload or infotext asks for."""
        if self.a1111 is not None and self.infotext is not None:
            raise InvalidPreview("give a1111 or infotext, not both")
        base, vae = (from_txt2img_payload(self.a1111) if self.a1111 is not None
                     else from_infotext(self.infotext) if self.infotext is not None else (None, None))
        given = self.model_fields_set if base is not None else set(type(self).model_fields)
        values = base.to_dict() if base is not None else {}
        for name in SAMPLING_FIELDS:
            if name in given and name in type(self).model_fields:
                values[name] = getattr(self, name)
        try:
            return Sampling(**values), vae
        except TypeError as exc:
            raise InvalidPreview(f"bad preview settings: {exc}") from None


def submit(session: Session, request: PreviewRequest) -> Preview:
    sampling, vae_name = request.sampling()
    targets = _targets(session, request)
    sampling.validate(targets=len(targets))
    vae = _decode_vae(session, request.vae if request.vae is not None else vae_name)
    total = len(targets) * sampling.images_per_target()
    data = {k: v for k, v in asdict(sampling).items() if k != "extra"}
    preview = Preview(status="queued", progress={"images_done": 0, "images_total": total}, cancel_requested=False,
                      attempts=0, dispatched_at=utcnow(), request={"targets": targets, "sampling": data, "vae": vae})
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


def _decode_vae(session: Session, ref: Ref | None) -> dict[str, Any] | None:
    """A registered model to decode with: {sha256, name (its file's, as the WebUI names VAEs)}."""
    if ref is None:
        return None
    try:
        (model,) = registry.find_ready(session, [str(ref)])
    except ResolveError:  # a WebUI payload or infotext names the VAE by its file name
        found = registry.find_leaf(session, None, str(ref))
        if found is None:
            raise
        model = registry.require_ready(found, str(ref))
    if "vae" not in (model.components or {}):
        raise InvalidPreview(f"model {model.name!r} has no VAE to decode with", model=str(ref))
    return {"sha256": model.sha256, "name": Path(model.path).name}


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
