"""`sdmerge serve`: migrate, then run the API, plus its worker as a child in the embedded mode."""

from __future__ import annotations

import ctypes
import gc
import ipaddress
import logging
import signal
import subprocess
import sys
import threading

from app.errors import BadRequest
from app.settings import Settings

log = logging.getLogger("sdmerge.serve")
CHILD_STOP_SECONDS = 10


def check_bind(host: str, settings: Settings) -> None:
    """Without a token the API is open to whoever can reach it: only loopback may reach it."""
    if settings.api_token:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise BadRequest(f"refusing to listen on {host} without SDMERGE_API_TOKEN; "
                         "set a token or bind 127.0.0.1")


def serve(settings: Settings, host: str, port: int, *, scan: bool = False, access_log: bool = False,
          api_workers: int = 1) -> None:
    import uvicorn

    from app.logs import configure_logging
    from app.main import create_app
    from app.migrate import upgrade

    check_bind(host, settings)
    log_config = configure_logging(settings.log_format, access_log=access_log)
    app = create_app(settings)
    runtime = app.state.runtime
    upgrade(runtime.engine)
    if scan:
        from app.services import registry

        with runtime.sessions() as session:
            found = registry.scan(session, settings)
            session.commit()
        _say(settings, f"scan registered {len(found['registered'])} models, skipped {len(found['skipped'])}")
        for skipped in found["skipped"]:  # one bad file never stops the server: say which and why
            _say(settings, f"skipped {skipped['path']}: {skipped['error']['message']}")
    # Everything built so far lives as long as the server: keep it out of the collector's scans,
    # and collect less often, so no request waits behind a full-heap GC pass (the poll tail).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    # A plan holds the GIL for up to the switch interval at a time; at 1 ms instead of 5 ms a
    # status poll waiting for it gets it sooner, at a negligible cost to the plan.
    sys.setswitchinterval(0.001)
    child = ChildWorker() if settings.embedded else None
    mode = "embedded (SQLite or given database, filesystem broker, child worker)" if child else "API only"
    _say(settings, f"serving on http://{host}:{port} (docs at /docs), data dir {settings.data_dir}, {mode}")
    try:
        if api_workers > 1:  # each process builds its own app from the same environment
            uvicorn.run("app.main:create_app", factory=True, workers=api_workers, host=host, port=port,
                        log_level="info", access_log=access_log, log_config=log_config)
        else:
            uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, log_config=log_config)
    finally:
        if child:
            child.stop()


def _say(settings: Settings, message: str) -> None:
    """To the terminal as `sdmerge: ...`; in JSON mode as a log line, so every line parses."""
    if settings.log_format == "json":
        log.info(message)
    else:
        print(f"sdmerge: {message}", flush=True)


class ChildWorker:
    """The embedded worker: restarted if it dies, stopped with the server, and killed by the
    kernel if the server itself is killed (so no orphan keeps merging)."""

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._process = self._start()
        threading.Thread(target=self._watch, name="child-worker", daemon=True).start()

    @staticmethod
    def _start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], preexec_fn=_die_with_parent)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            code = self._process.wait()
            if self._stopping.is_set():
                return
            log.error("embedded worker exited with %s; restarting it", code)
            self._process = self._start()

    def stop(self) -> None:
        self._stopping.set()
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(CHILD_STOP_SECONDS)
        except subprocess.TimeoutExpired:  # a merge in progress; its job is re-run at next start
            self._process.kill()
            self._process.wait()


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
