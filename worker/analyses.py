"""Running one analysis under a lease: resolve the models, one streaming pass, the report.

The report is written into a staging folder of this attempt (`tmp/analysis-<id>-<owner>.partial`)
and moved to `artifacts/analyses/<id>/` by one rename, by the lease holder only, in the
transaction that records `succeeded`: no reader ever sees half a report.
"""

from __future__ import annotations

import shutil

from app.models import Analysis
from app.runtime import Runtime
from app.services.files import publish_dir, result_dir, staging_dir
from merge_engine.analysis import AnalysisInput, analyze
from merge_engine.analysis_report import write_report
from merge_engine.recipe import ModelLeaf
from worker import lease
from worker.hashing import rehash_if_changed
from worker.jobs import registry_resolver
from worker.lease import Heartbeat, Outcome

REPORT_FORMATS = ("png",)


def run_analysis(runtime: Runtime, analysis_id: int, owner: str | None = None) -> str | None:
    """Run the analysis if it can be claimed (or under `owner`'s lease, already claimed); returns its
    final status, or None if it was not ours."""
    def work(heartbeat: Heartbeat) -> Outcome:
        return _analyze(runtime, analysis_id, heartbeat)

    return lease.run_leased(runtime, Analysis, analysis_id, work, owner=owner)


def _analyze(runtime: Runtime, analysis_id: int, heartbeat: Heartbeat) -> Outcome:
    settings = runtime.settings
    with runtime.sessions() as session:
        request = session.get(Analysis, analysis_id).request
    resolve = registry_resolver(runtime)

    def as_input(model: dict) -> AnalysisInput:
        found = resolve(ModelLeaf(sha256=model["sha256"], name=model["name"]))
        return AnalysisInput(found.path, model["name"], model["id"], model["sha256"])

    staging = staging_dir(settings, Analysis.kind, analysis_id, heartbeat.owner)
    try:
        with rehash_if_changed(runtime.sessions):
            result = analyze([as_input(m) for m in request["models"]], request["components"], request["metrics"],
                             base=as_input(request["base"]) if request["base"] else None,
                             progress=heartbeat.record, should_cancel=heartbeat.should_stop,
                             threads=settings.merge_threads, device=settings.merge_device)
        heartbeat.check()
        write_report(result, staging / "report", formats=REPORT_FORMATS)
        heartbeat.check()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    def publish() -> None:
        publish_dir(staging / "report", result_dir(settings, Analysis.kind, analysis_id))

    return Outcome("succeeded", publish=publish, cleanup=lambda: shutil.rmtree(staging, ignore_errors=True))
