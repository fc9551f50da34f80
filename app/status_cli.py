"""`sdmerge status [--url URL] [--watch [SECONDS]]`: the deployment in a terminal, read from
`GET /system/status` over HTTP, so it works from any host that reaches the API (the token comes
from SDMERGE_API_TOKEN). Plain text: queues, workers, running work with progress bars, counts by
kind and status, recent failures, free space."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
BAR = 24
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")  # the columns of the work table


def run_status(url: str | None, watch: float | None) -> int:
    url = (url or os.environ.get("SDMERGE_URL") or DEFAULT_URL).rstrip("/")
    token = os.environ.get("SDMERGE_API_TOKEN") or None
    while True:
        try:
            view = _view(url, token)
        except StatusError as exc:
            print(f"sdmerge: {exc}", file=sys.stderr)
            if watch is None:
                return 1
            view = f"sdmerge: {exc}\n"
        if watch is None:
            sys.stdout.write(view)
            return 0
        sys.stdout.write("\x1b[H\x1b[2J" + view)  # home, clear: redraw in place
        sys.stdout.flush()
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return 0


class StatusError(Exception):
    pass


def fetch(url: str, token: str | None) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}/system/status", headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        hint = " (set SDMERGE_API_TOKEN)" if exc.code == 401 else ""
        raise StatusError(f"{url}/system/status answered {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StatusError(f"cannot read {url}/system/status: {getattr(exc, 'reason', exc)}") from None


def _view(url: str, token: str | None) -> str:
    status = fetch(url, token)
    try:
        return render(status, url)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # JSON, but not a status: another server?
        raise StatusError(f"{url}/system/status answered something other than a status "
                          f"({type(exc).__name__}: {exc})") from None


def render(status: dict[str, Any], url: str) -> str:
    lines = [f"sdmerge status  {url}  {status['time']}", ""]
    broker = status["broker"]
    queues = "  ".join(f"{name} {n}" for name, n in broker["queues"].items())
    lines.append(f"broker   {broker['status']}" + (f"   waiting: {queues}" if queues else ""))
    workers = status["workers"]
    alive = sum(w["alive"] for w in workers)
    lines += ["", f"workers  {alive} alive, {len(workers) - alive} stale"]
    for w in workers:
        doing = f"{w['running']['kind']} {w['running']['id']}" if w.get("running") else "idle"
        state = "" if w["alive"] else "  STALE"
        lines.append(f"  {w['name']:<36} {','.join(w['queues']):<18} {w['device']:<7} "
                     f"beat {_duration(w['age_seconds'])} ago  {doing}{state}")
    lines += ["", f"running  {len(status['running'])}"]
    for r in status["running"]:
        lines.append("  " + running_line(r))
    lines += ["", "work       " + " ".join(f"{s:>9}" for s in STATUSES)]
    for kind, counts in status["work"].items():  # every kind of work the API counts (merge, shard, ...)
        if kind != "model":
            lines.append(f"  {kind:<9}" + " ".join(f"{counts.get(s, 0):>9}" for s in STATUSES))
    models = status["work"].get("model", {})
    lines.append("  models   " + ", ".join(f"{n} {s}" for s, n in models.items()))
    if status["recent_failures"]:
        lines += ["", "recent failures"]
        for f in status["recent_failures"]:
            error = f["error"]
            lines.append(f"  {f['kind']} {f['id']}  {f['finished_at']}  {error.get('code')}: {error.get('message')}")
    disk = status["disk"]
    if disk.get("free_bytes") is not None:
        lines += ["", f"disk     {_bytes(disk['free_bytes'])} free of {_bytes(disk['total_bytes'])}"
                      f" ({disk['check']})"]
    return "\n".join(lines) + "\n"


def running_line(r: dict[str, Any]) -> str:
    """One running row: its bar, what is done of what, its rate and ETA."""
    p = r.get("progress") or {}
    label = f"{r['kind']} {r['id']}" + (f" {r['name']}" if r.get("name") else "")
    if "bytes_total" in p:
        done, total = p.get("bytes_read") or 0, p["bytes_total"] or 0
        rate, eta = p.get("rate_bytes_per_second"), p.get("eta_seconds")
        figures = f"{_bytes(done)}/{_bytes(total)}" + (f"  {_bytes(rate)}/s" if rate else "") \
            + (f"  ETA {_duration(eta)}" if eta is not None else "")
    elif "images_total" in p:
        done, total = p.get("images_done") or 0, p["images_total"] or 0
        rate = p.get("rate_images_per_second")
        figures = f"{done}/{total} images" + (f"  {rate:.2f} img/s" if rate else "")
    else:
        done, total, figures = 0, 0, "starting"
    fraction = min(done / total, 1.0) if total else 0.0
    filled = round(fraction * BAR)
    stale = "  LEASE EXPIRED" if r.get("lease_expired") else ""
    return (f"{label:<28} [{'#' * filled}{'.' * (BAR - filled)}] {fraction:>4.0%}  {figures}"
            f"  beat {_duration(r['heartbeat_age_seconds'])} ago{stale}")


def _bytes(n: float | None) -> str:
    n = float(n or 0)
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
