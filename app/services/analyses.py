"""Weight analyses: a request checked against the registry at submit time, run as leased work,
and its report (analysis.json, heatmaps, maps) served from `artifacts/analyses/<id>/`.

Everything that can be checked without reading a weight is checked here, from the registry's
rows (no file is opened, so no torch, even for pickled checkpoints): at least two models, known
components and metrics, every model holding the components, one architecture, and the same
number of keys and parameters per component. What is left (a key named differently, a NaN) is
found by the worker's streaming pass and fails the analysis with the engine's message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from app.dispatch import enqueue
from app.errors import InvalidAnalysis, NotFound
from app.models import Analysis, Model, utcnow
from app.queue import ANALYSIS_TASK
from app.services import leased, registry
from app.services.files import result_dir
from app.settings import Settings
from merge_engine.errors import ArchitectureError, LayoutMismatchError
from merge_engine.recipe import COMPONENTS

# merge_engine.analysis.METRICS; that module imports torch, so a structure test keeps these equal.
METRICS = ("l2", "cosine")
DEFAULT_HEATMAP_METRIC = "cosine"
REPORT = "analysis.json"

Ref = str | int


class AnalysisRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[Ref] = Field(description="two or more model references: registry id, name or `sha256:<hex>`")
    components: list[str] | None = Field(
        default=None, description=f"any of {', '.join(COMPONENTS)}; default: every component all the models have")
    metrics: list[str] | None = Field(default=None, description=f"any of {', '.join(METRICS)}; default: both")
    base: Ref | None = Field(default=None, description="compare task vectors (each model minus this one)")


def submit(session: Session, request: AnalysisRequest) -> Analysis:
    if len(request.models) < 2:
        raise InvalidAnalysis(f"an analysis compares at least 2 models, got {len(request.models)}")
    metrics = list(dict.fromkeys(request.metrics or METRICS))
    if unknown := [m for m in metrics if m not in METRICS]:
        raise InvalidAnalysis(f"unknown metric {unknown[0]!r} (use {', '.join(METRICS)})",
                              details={"metric": unknown[0]})
    if request.components is not None:
        if unknown := [c for c in request.components if c not in COMPONENTS]:
            raise InvalidAnalysis(f"unknown component {unknown[0]!r} (use {', '.join(COMPONENTS)})",
                                  component=unknown[0])
        if not request.components:
            raise InvalidAnalysis("components is empty; leave it out to analyse every shared component")
    refs = [str(ref) for ref in request.models] + ([str(request.base)] if request.base is not None else [])
    found = registry.find_ready(session, refs)
    models, base = found[:len(request.models)], (found[-1] if request.base is not None else None)
    rows = models + ([base] if base else [])
    architecture = _architecture(rows)
    components = _components(rows, request.components)
    analysis = Analysis(
        status="queued", architecture=architecture, progress=None, cancel_requested=False, attempts=0,
        dispatched_at=utcnow(),
        request={"models": [_describe(m) for m in models], "base": _describe(base) if base else None,
                 "components": components, "metrics": metrics})
    session.add(analysis)
    session.flush()
    enqueue(session, ANALYSIS_TASK, analysis.id)
    return analysis


def _describe(model: Model) -> dict[str, Any]:
    return {"id": model.id, "name": model.name, "sha256": model.sha256}


def _components(rows: list[Model], wanted: list[str] | None) -> list[str]:
    """The components asked for (or all that every model has), checked to match across models."""
    held = [set(row.components or {}) for row in rows]
    if wanted is None:
        wanted = [c for c in COMPONENTS if all(c in h for h in held)]
        if not wanted:
            raise LayoutMismatchError("the models share no component to compare",
                                      details={"models": [r.name for r in rows]})
    for component in dict.fromkeys(wanted):
        for row in rows:
            if component not in (row.components or {}):
                raise LayoutMismatchError(f"model has no {component} to compare", model=row.name, component=component)
        first = rows[0]
        for row in rows[1:]:
            # Parameters, not keys: an integer buffer (position_ids) may be absent from some files.
            ours, theirs = (r.components[component].get("params") for r in (first, row))
            if ours != theirs:
                raise LayoutMismatchError(
                    f"the {component} has {theirs} parameters here and {ours} in {first.name!r}",
                    model=row.name, component=component)
    return list(dict.fromkeys(wanted))


def _architecture(rows: list[Model]) -> str | None:
    known = [row for row in rows if row.architecture]
    for row in known[1:]:
        if row.architecture != known[0].architecture:
            raise ArchitectureError(
                f"cannot compare {row.architecture} model {row.name!r} with {known[0].architecture} "
                f"model {known[0].name!r}", model=row.name,
                details={"models": [known[0].name, row.name], "architectures": [known[0].architecture, row.architecture]})
    return known[0].architecture if known else None


def get(session: Session, settings: Settings, analysis_id: int, *, with_result: bool = True) -> dict[str, Any]:
    return view(settings, leased.get_row(session, Analysis, analysis_id), with_result=with_result)


def list_analyses(session: Session, settings: Settings, **page: Any) -> list[dict[str, Any]]:
    return [view(settings, row, with_result=False) for row in leased.list_rows(session, Analysis, **page)]


def cancel(session: Session, settings: Settings, analysis_id: int) -> dict[str, Any]:
    return view(settings, leased.cancel(session, Analysis, analysis_id), with_result=False)


def delete(session: Session, settings: Settings, analysis_id: int) -> dict[str, Any] | None:
    """Cancels a queued or running analysis; forgets a finished one and removes its report."""
    row = leased.delete(session, settings, Analysis, analysis_id)
    return None if row is None else view(settings, row, with_result=False)


def view(settings: Settings, row: Analysis, *, with_result: bool) -> dict[str, Any]:
    """The row as the API shows it; once it succeeded, links to its pictures and (if asked) the
    report itself."""
    out = {name: getattr(row, name) for name in (
        "id", "status", "architecture", "progress", "error", "cancel_requested", "attempts",
        "created_at", "started_at", "finished_at")}
    out.update(row.request)
    out["files"] = out["result"] = None
    if row.status == "succeeded":
        base = f"/analyses/{row.id}"
        out["files"] = {
            "heatmaps": {c: {m: f"{base}/heatmap-{c}.png?metric={m}" for m in row.request["metrics"]}
                         for c in row.request["components"]},
            "maps": {c: f"{base}/map-{c}.png" for c in row.request["components"]},
        }
        if with_result:
            out["result"] = _report(settings, row.id)
    return out


def _report(settings: Settings, analysis_id: int) -> dict[str, Any]:
    try:
        return json.loads((result_dir(settings, Analysis.kind, analysis_id) / REPORT).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound("the analysis's report is missing from the store", details={"id": analysis_id}) from None


def picture(session: Session, settings: Settings, analysis_id: int, kind: str, component: str,
            metric: str | None = None) -> Path:
    """The PNG of a heatmap (`kind` "heatmap", per metric) or a 2-D map of a succeeded analysis."""
    row = leased.get_row(session, Analysis, analysis_id)
    if row.status != "succeeded":
        raise NotFound(f"the analysis is {row.status}; its pictures exist once it has succeeded",
                       details={"id": analysis_id, "status": row.status})
    if component not in row.request["components"]:
        raise NotFound(f"the analysis has no component {component!r}", component=component,
                       details={"components": row.request["components"]})
    if kind == "heatmap":
        computed = row.request["metrics"]
        metric = metric or (DEFAULT_HEATMAP_METRIC if DEFAULT_HEATMAP_METRIC in computed else computed[0])
        if metric not in computed:
            raise NotFound(f"the analysis did not compute the {metric} metric",
                           details={"metric": metric, "metrics": computed})
        name = f"heatmap-{component}-{metric}.png"
    else:
        name = f"map-{component}.png"
    path = result_dir(settings, Analysis.kind, analysis_id) / name
    if not path.is_file():
        raise NotFound("the picture is missing from the store", details={"id": analysis_id, "file": name})
    return path
