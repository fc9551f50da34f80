"""`GET /metrics` in Prometheus' text format: a collector that asks the deployment's sources of
truth at scrape time (app/services/status.py), on a registry of the app's own (made by the app
factory, nothing at import time). No figure is counted in this process's memory, so every API
process behind a load balancer reports the same values, and a restart loses none.

Counters here are totals over the rows in the database: deleting finished work lowers them,
which Prometheus' rate() reads as a counter reset.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from app.models import utcnow
from app.runtime import Runtime
from app.services import status
from merge_engine import __version__


class DeploymentCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def describe(self) -> list:
        return []  # nothing to ask for at registration: collect() runs at scrape time only

    def collect(self) -> Iterator:
        runtime = self.runtime
        with runtime.sessions() as session:
            counts = status.work_counts(session)
            running = status.running(session, utcnow())
            expiries = status.lease_expiries(session)
            durations = status.durations(session)
            totals = status.throughput(session)
        info = GaugeMetricFamily("sdmerge_info", "The version and mode of this API process",
                                 labels=["version", "mode"])
        info.add_metric([__version__, "embedded" if runtime.settings.embedded else "scale-out"], 1)
        yield info
        yield from _work(counts, running, expiries, durations)
        yield from _throughput(running, totals)
        yield from _broker(status.queue_depths(runtime))
        yield from _workers(status.read_workers(runtime.settings))
        yield from _disk(status.disk_usage(runtime.settings))
        yield GaugeMetricFamily("sdmerge_scrape_timestamp_seconds", "When this scrape was answered (Unix time)",
                                value=time.time())


def _work(counts: dict, running: list[dict], expiries: dict, durations: dict) -> Iterator:
    jobs = GaugeMetricFamily("sdmerge_jobs", "Leased work (merge, analysis, preview) by kind and status",
                             labels=["kind", "status"])
    for kind in status.KINDS:
        for state, n in counts[kind].items():
            jobs.add_metric([kind, state], n)
    yield jobs
    models = GaugeMetricFamily("sdmerge_models", "Registered models by status", labels=["status"])
    for state, n in counts["model"].items():
        models.add_metric([state], n)
    yield models
    lapsed = CounterMetricFamily("sdmerge_lease_expiries", "Work claimed again after its lease lapsed "
                                 "(a worker crashed or stalled), by kind", labels=["kind"])
    for kind, n in expiries.items():
        lapsed.add_metric([kind], n)
    yield lapsed
    histogram = HistogramMetricFamily("sdmerge_job_duration_seconds", "Seconds from first claim to end of "
                                      "finished work, by kind and status", labels=["kind", "status"])
    for (kind, state), figures in sorted(durations.items()):
        buckets = [(_bound(b), n) for b, n in zip(status.DURATION_BUCKETS, figures["buckets"], strict=True)]
        histogram.add_metric([kind, state], buckets + [("+Inf", figures["count"])], figures["sum"])
    yield histogram
    oldest = GaugeMetricFamily("sdmerge_running_seconds_max", "How long the longest-running work of each kind "
                               "has run", labels=["kind"])
    beat = GaugeMetricFamily("sdmerge_lease_heartbeat_age_seconds_max", "Seconds since the stalest lease of "
                             "running work was renewed (its worker's heartbeat), by kind", labels=["kind"])
    for kind in status.KINDS:
        rows = [r for r in running if r["kind"] == kind]
        oldest.add_metric([kind], max((r["running_seconds"] or 0.0 for r in rows), default=0.0))
        beat.add_metric([kind], max((r["heartbeat_age_seconds"] for r in rows), default=0.0))
    yield oldest
    yield beat


def _throughput(running: list[dict], totals: dict) -> Iterator:
    merges = [r["progress"] or {} for r in running if r["kind"] == "merge"]
    previews = [r["progress"] or {} for r in running if r["kind"] == "preview"]
    yield GaugeMetricFamily("sdmerge_merge_rate_bytes_per_second", "Bytes per second the running merges read, "
                            "all together", value=sum(p.get("rate_bytes_per_second") or 0.0 for p in merges))
    yield GaugeMetricFamily("sdmerge_preview_rate_images_per_second", "Images per second the running previews "
                            "render, all together", value=sum(p.get("rate_images_per_second") or 0.0 for p in previews))
    for name, key, text in (
            ("sdmerge_merge_read_bytes", "merge_read_bytes", "Bytes read by succeeded merges"),
            ("sdmerge_merge_written_bytes", "merge_written_bytes", "Bytes written by succeeded merges"),
            ("sdmerge_merge_seconds", "merge_seconds", "Seconds succeeded merges spent merging"),
            ("sdmerge_preview_images", "preview_images", "Images rendered by succeeded previews"),
            ("sdmerge_preview_seconds", "preview_seconds", "Seconds succeeded previews spent rendering")):
        yield CounterMetricFamily(name, text + " (their ratio is the average rate)", value=totals[key])


def _broker(broker: dict) -> Iterator:
    yield GaugeMetricFamily("sdmerge_broker_up", "Whether the broker answered", value=broker["status"] == "ok")
    depth = GaugeMetricFamily("sdmerge_queue_depth", "Messages waiting in each broker queue", labels=["queue"])
    for queue, n in broker["queues"].items():
        depth.add_metric([queue], n)
    yield depth


def _workers(workers: list[dict]) -> Iterator:
    alive = GaugeMetricFamily("sdmerge_workers", "Workers by state (alive: heard of within 30 s)",
                              labels=["state"])
    alive.add_metric(["alive"], sum(w["alive"] for w in workers))
    alive.add_metric(["stale"], sum(not w["alive"] for w in workers))
    yield alive
    beat = GaugeMetricFamily("sdmerge_worker_heartbeat_timestamp_seconds", "When each worker last beat "
                             "(Unix time)", labels=["worker", "queues", "device"])
    for w in workers:
        beat.add_metric([w["name"], ",".join(w.get("queues") or []), str(w.get("device"))], w["beat_at"])
    yield beat


def _disk(disk: dict) -> Iterator:
    if disk.get("free_bytes") is None:
        return
    yield GaugeMetricFamily("sdmerge_data_free_bytes", "Free bytes in the data dir's file system",
                            value=disk["free_bytes"])
    yield GaugeMetricFamily("sdmerge_data_size_bytes", "Size of the data dir's file system",
                            value=disk["total_bytes"])
    yield GaugeMetricFamily("sdmerge_data_min_free_bytes", "Below this much free space /ready fails "
                            "(SDMERGE_MIN_FREE_BYTES)", value=disk["min_free_bytes"])


def _bound(value: float) -> str:
    return repr(float(value))


def make_registry(runtime: Runtime) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeploymentCollector(runtime))
    return registry
