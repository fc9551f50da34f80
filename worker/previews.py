"""Running one preview under a lease: sample every target, prompt and seed into PNGs.

The images and the grid are rendered into a staging folder of this attempt
(`tmp/preview-<id>-<owner>.partial`) and moved to `artifacts/previews/<id>/` by one rename, by
the lease holder only, in the transaction that records `succeeded`. The engine (and torch) is
imported when a preview runs, not when the worker starts.
"""

from __future__ import annotations

import shutil

from app.models import Preview
from app.runtime import Runtime
from app.services.files import publish_dir, result_dir, staging_dir
from merge_engine.recipe import ModelLeaf, parse_recipe
from worker import lease
from worker.hashing import rehash_if_changed
from worker.jobs import registry_resolver
from worker.lease import Heartbeat, Outcome


def run_preview(runtime: Runtime, preview_id: int, owner: str | None = None) -> str | None:
    """Run the preview if it can be claimed (or under `owner`'s lease, already claimed); returns its
    final status, or None if it was not ours."""
    def work(heartbeat: Heartbeat) -> Outcome:
        return _render(runtime, preview_id, heartbeat)

    return lease.run_leased(runtime, Preview, preview_id, work, describe=image_progress, owner=owner)


def image_progress(progress: tuple[int, int]) -> dict:
    done, total = progress
    return {"images_done": done, "images_total": total}


def _render(runtime: Runtime, preview_id: int, heartbeat: Heartbeat) -> Outcome:
    from merge_engine.preview.render import DecodeVae, Sampling, Target, render_previews

    settings = runtime.settings
    with runtime.sessions() as session:
        request = session.get(Preview, preview_id).request
    resolve = registry_resolver(runtime)
    targets = [Target(t["label"], parse_recipe(t["recipe"]), resolve, t["model_name"], t["model_hash"])
               for t in request["targets"]]
    topics = [Sampling(**t) for t in request.get("topics") or [request["sampling"]]]
    anchor = parse_recipe(request["anchor"]) if request.get("anchor") else None
    vae = request.get("vae")
    decode = DecodeVae(ModelLeaf(sha256=vae["sha256"], name=vae["name"]), vae["name"]) if vae else None
    staging = staging_dir(settings, Preview.kind, preview_id, heartbeat.owner)
    out = staging / "out"
    try:
        with rehash_if_changed(runtime.sessions):
            result = render_previews(targets, topics, out, device=settings.preview_device,
                                     progress=lambda done, total: heartbeat.record((done, total)),
                                     should_cancel=heartbeat.should_stop, vae=decode,
                                     grid_rows=request.get("grid_rows"), anchor=anchor)
        heartbeat.check()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary = {
        "images": [{"index": image.index, "file": image.path.relative_to(out).as_posix(),
                    "target_index": image.target_index, "topic_index": image.topic_index,
                    "prompt_index": image.prompt_index, "seed": image.seed,
                    "infotext": image.infotext} for image in result.images],
        "grid": result.grid is not None,
        "grid_file": result.grid.relative_to(out).as_posix() if result.grid is not None else None,
        "seconds": round(result.seconds, 3),
        "derived": result.derived,
    }

    def publish() -> None:
        publish_dir(out, result_dir(settings, Preview.kind, preview_id))

    return Outcome("succeeded", values={"result": summary}, publish=publish,
                   cleanup=lambda: shutil.rmtree(staging, ignore_errors=True))
