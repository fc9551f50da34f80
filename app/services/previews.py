"""Previews: images sampled from models, finished merges or recipes, as leased work on the
`preview` queue; the images and the grid are served from `artifacts/previews/<id>/`.

Every target becomes, at submit time, a label and a canonical recipe whose leaves are named by
sha256 (a model: that file alone; a merge: its artifact; a recipe: planned against the registry
like a merge). The sampling parameters are checked by the engine's own torch-free `Sampling`.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.dispatch import enqueue
from app.errors import Conflict, InvalidPreview, NotFound
from app.models import MAX_ROW_ID, Job, Model, Preview, utcnow
from app.queue import PREVIEW_TASK
from app.services import leased, merges, registry
from app.services.files import result_dir, staging_dir
from app.settings import Settings
from merge_engine.errors import ResolveError
from merge_engine.preview.a1111_settings import from_infotext, from_txt2img_payload
from merge_engine.preview.params import PREDICTION_TYPES, SAMPLERS, Sampling, check_topics
from merge_engine.preview.sweeps import Source, expand, parse_sweep
from merge_engine.recipe import parse_recipe

Ref = str | int
DEFAULTS = {f.name: f.default for f in fields(Sampling) if f.name != "extra"}
SAMPLING_FIELDS = tuple(DEFAULTS) + ("prompts",)


class PreviewSettings(BaseModel):
    """Sampling settings: fields, or an A1111 txt2img body or infotext with fields over it."""

    model_config = ConfigDict(extra="forbid")

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
    batch_size: int = DEFAULTS["batch_size"]
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
    a1111: dict[str, Any] | None = Field(
        default=None, description="an A1111 txt2img API body (what /sdapi/v1/txt2img takes): its settings, prompt "
                                  "and seeds; fields given beside it here override it")
    infotext: str | None = Field(default=None, description="a pasted A1111 infotext; as `a1111`")

    def imported(self, seeds_given: bool = False) -> tuple[dict[str, Any], str | None]:
        """The settings its payload or infotext gives (as Sampling fields), and the VAE it names
        (a payload's random seed is fine where seeds are given beside it)."""
        if self.a1111 is not None and self.infotext is not None:
            raise InvalidPreview("give a1111 or infotext, not both")
        if self.a1111 is None and self.infotext is None:
            return {}, None
        base, vae = (from_txt2img_payload(self.a1111, seeds_given=seeds_given or "seeds" in self.model_fields_set)
                     if self.a1111 is not None else from_infotext(self.infotext))
        return base.to_dict(), vae

    def given(self) -> dict[str, Any]:
        """The sampling fields set explicitly."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if name in self.model_fields_set}


class Topic(PreviewSettings):
    name: str | None = Field(default=None, max_length=200, description="how the topic is called (e.g. its file)")


class PreviewRequest(PreviewSettings):
    targets: list[Ref | dict[str, Any]] = Field(
        default=[], description="each a model reference (registry id, name or `sha256:<hex>`), "
                                "`{\"merge\": JOB_ID}` (a succeeded merge's output) or `{\"recipe\": {...}}` (with an "
                                "optional `label`, its column header)")
    base: Ref | None = Field(default=None, description="text-encoder sweep: the model to take everything else from")
    swap_text_encoder_from: list[Ref] = Field(
        default=[], description="text-encoder sweep: one target per model, `base` with this model's text_encoder")
    sweep: dict[str, Any] | None = Field(
        default=None, description="a sweep instead of targets: {base, kind: text_encoder | unet | vae | "
                                  "leave_one_out | weight, candidates | at | path and values} or {base, x: {...}, "
                                  "y: {...}}; base and candidates are model references, {\"merge\": JOB_ID} or "
                                  "{\"recipe\": {...}}")
    topics: list[Topic] = Field(
        default=[], max_length=64, description="several prompt sets or A1111 payloads, each its own rows; the "
                                               "fields given beside them apply to all but what a topic sets")
    vae: Ref | None = Field(default=None, description="decode every image with this model's VAE (the WebUI's sd_vae)")

    def samplings(self) -> tuple[list[Sampling], str | None]:
        """One Sampling per topic (the request itself when it has none): its payload, then the
        fields given on the request, then the topic's own fields; and the VAE the payloads name."""
        if self.topics and "prompts" in self.model_fields_set:
            raise InvalidPreview("give prompts in each topic, or no topics")
        topics = self.topics or [self]
        out, vaes = [], set()
        for i, topic in enumerate(topics):
            values, vae = topic.imported(seeds_given="seeds" in self.model_fields_set)
            if topic is not self:
                values.update(self.given())  # the shared fields (prompts are the topics' own)
            values.update(topic.given())
            try:
                out.append(Sampling(**{"prompts": (), **values}))
            except TypeError as exc:
                raise InvalidPreview(f"bad preview settings{f' in topics[{i}]' if self.topics else ''}: {exc}") from None
            vaes.add(vae)
        named = sorted(v for v in vaes if v is not None)
        if len(named) > 1 or (named and None in vaes and self.vae is None):
            raise InvalidPreview(f"the topics ask for different VAEs ({', '.join(named)} or none); give vae")
        return out, named[0] if named else None


def submit(session: Session, settings: Settings, request: PreviewRequest) -> Preview:
    topics, vae_name = request.samplings()
    targets, rows, anchor = _targets(session, settings, request)
    check_topics(topics, len(targets))
    vae = _decode_vae(session, request.vae if request.vae is not None else vae_name)
    total = len(targets) * sum(t.images_per_target() for t in topics)
    data = [t.to_dict() for t in topics]
    names = [t.name for t in request.topics] if request.topics else [None]
    preview = Preview(status="queued", progress={"images_done": 0, "images_total": total}, cancel_requested=False,
                      attempts=0, dispatched_at=utcnow(),
                      request={"targets": targets, "sampling": data[0], "topics": data, "topic_names": names,
                               "vae": vae, "grid_rows": rows, "anchor": anchor})
    session.add(preview)
    session.flush()
    enqueue(session, PREVIEW_TASK, preview.id)
    return preview


def _targets(session: Session, settings: Settings, request: PreviewRequest) -> tuple[list[dict[str, Any]], list[str] | None, Any]:
    """Each target as {label, recipe (canonical), model_name, model_hash, source}, in order:
    `targets` first, then the text-encoder sweep; or a sweep's variants (with its grid rows and
    anchor recipe)."""
    if request.sweep is not None:
        if request.targets or request.base is not None or request.swap_text_encoder_from:
            raise InvalidPreview("give targets (or base and swap_text_encoder_from) or a sweep, not both")
        return sweep_targets(session, settings, request.sweep)
    if request.base is None and request.swap_text_encoder_from:
        raise InvalidPreview("swap_text_encoder_from needs a base model to swap into")
    if request.base is not None and not request.swap_text_encoder_from:
        raise InvalidPreview("base is for a text-encoder sweep: give swap_text_encoder_from too")
    if not request.targets and request.base is None:
        raise InvalidPreview("give at least one target, a sweep, or a base and swap_text_encoder_from")
    refs = [str(t) for t in request.targets if not isinstance(t, dict)]
    sweep = [str(request.base), *map(str, request.swap_text_encoder_from)] if request.base is not None else []
    models = dict(zip(refs + sweep, registry.find_ready(session, refs + sweep), strict=True))
    out, recipes = [], 0
    for position, target in enumerate(request.targets):
        if not isinstance(target, dict):
            out.append(_model_target(models[str(target)]))
        elif set(target) == {"merge"}:
            out.append(_merge_target(session, target["merge"], position))
        elif set(target) in ({"recipe"}, {"recipe", "label"}):
            recipes += 1
            out.append(_recipe_target(session, target["recipe"], f"recipe {recipes}", {"recipe": recipes}, settings))
            if "label" in target:
                if not isinstance(target["label"], str) or not 0 < len(target["label"]) <= 200:
                    raise InvalidPreview(f"targets[{position}]: a label is 1 to 200 characters of text",
                                         details={"target": position})
                out[-1]["label"] = out[-1]["model_name"] = target["label"]
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
    return out, None, None


def sweep_targets(session: Session, settings: Settings, body: Any) -> tuple[list[dict[str, Any]], list[str] | None, Any]:
    """A sweep's variants as targets, its grid rows (an XY table) and its anchor recipe."""
    sweep = parse_sweep(body)
    base = source(session, settings, sweep.base, "sweep.base", as_recipe=sweep.derived)
    planned = merges.plan_body(session, base.recipe.model_dump(mode="json"), settings)
    planned.close()

    def candidates(axis) -> list[Source]:
        return [source(session, settings, ref, f"sweep candidate {i}", as_recipe=False)
                for i, ref in enumerate(axis.candidates)]

    def registered(leaf: Any) -> str | None:
        sha = leaf.get("sha256") if isinstance(leaf, dict) else None
        model = session.scalars(select(Model).where(Model.sha256 == sha).limit(1)).first() if sha else None
        return model.name if model is not None else None

    expanded = expand(sweep, base, candidates, planned.architecture or "", registered)
    out = []
    for cell in expanded.cells:
        target = _recipe_target(session, cell.recipe.model_dump(mode="json"), cell.label, {"sweep": cell.source},
                                settings)
        target["label"], target["model_name"] = cell.label, cell.model_name
        out.append(target)
    anchor = expanded.anchor
    if anchor is not None:
        anchored = merges.plan_body(session, anchor.model_dump(mode="json"), settings)
        anchored.close()
        anchor = anchored.canonical_recipe.model_dump(mode="json")
    return out, expanded.rows, anchor


def source(session: Session, settings: Settings, ref: Any, where: str, *, as_recipe: bool) -> Source:
    """A sweep's base or candidate as a labelled recipe whose leaves are registered models: a
    model reference, {"merge": JOB_ID} (its output file; with `as_recipe`, its recipe, so that a
    leave-one-out can take it apart) or {"recipe": {...}}."""
    if isinstance(ref, dict) and set(ref) == {"merge"}:
        job_id = ref["merge"]
        if isinstance(job_id, bool) or not isinstance(job_id, int) or not 1 <= job_id <= MAX_ROW_ID:
            raise InvalidPreview(f"{where}: merge must be a merge job id (a positive integer)")
        job = session.get(Job, job_id)
        if job is None:
            raise InvalidPreview(f"{where}: no merge job #{job_id}")
        label = job.name or f"merge #{job_id}"
        if as_recipe:
            return Source(label, parse_recipe(job.recipe))
        if job.status != "succeeded" or job.artifact is None:
            raise Conflict(f"merge #{job_id} has no output to sweep with ({job.status})",
                           details={"merge": job_id, "status": job.status})
        return Source(label, parse_recipe({"merge": _leaf(job.artifact.sha256, job.artifact.filename)}))
    if isinstance(ref, dict) and set(ref) == {"recipe"}:
        planned = merges.plan_body(session, ref["recipe"], settings)
        planned.close()
        return Source(planned.recipe.name or where, planned.canonical_recipe)
    if isinstance(ref, bool) or not isinstance(ref, str | int):
        raise InvalidPreview(f"{where} must be a model reference, {{\"merge\": JOB_ID}} or {{\"recipe\": {{...}}}}")
    (model,) = registry.find_ready(session, [str(ref)])
    return Source(model.name, parse_recipe({"merge": _leaf(model.sha256, model.name)}))


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


def _recipe_target(session: Session, body: Any, fallback: str, source: dict[str, Any],
                   settings: Settings | None = None) -> dict[str, Any]:
    planned = merges.plan_body(session, body, settings)
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
    out["topics"] = row.request.get("topics") or [row.request["sampling"]]
    out["grid_rows"] = row.request.get("grid_rows")
    out["grid"], out["images"] = None, []
    if row.status == "succeeded" and row.result:
        base = f"/previews/{row.id}"
        out["grid"] = f"{base}/grid.png" if row.result["grid"] else None
        out["images"] = [{"url": f"{base}/images/{image['index']}.png",
                          "topic_index": image.get("topic_index", 0),
                          **{k: image[k] for k in ("index", "target_index", "prompt_index", "seed", "infotext")}}
                         for image in row.result["images"]]
        out["seconds"] = row.result.get("seconds")
    return out


def image(session: Session, settings: Settings, preview_id: int, index: int | None) -> Path:
    """The PNG of image `index`, or of the grid (None), of a succeeded preview."""
    row = leased.get_row(session, Preview, preview_id)
    if row.status == "running" and index is not None and row.lease_owner:
        # While it runs, the images already written (each renamed into place whole) are shown.
        path = staging_dir(settings, Preview.kind, preview_id, row.lease_owner) / "out" / "images" / f"{index}.png"
        if path.is_file():
            return path
        raise NotFound("the image is not rendered yet", details={"id": preview_id, "image": index})
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
