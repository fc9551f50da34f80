"""What the browser tests drive: a real `sdmerge serve` (embedded: SQLite, filesystem broker, child
worker) on a free port, and Debian's Chromium through Playwright (its own browser download cannot
work here). Used by tests/browser/conftest.py; importable by any test that wants its own server."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service.conftest import free_port
from tests.service.servers import SDMERGE, Process, service_env, wait_for, wait_healthy

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
# Playwright adds its own automation flags; these keep Chromium off the closed network and make
# it start as root in a container. Nothing here has a sandbox to lose: it opens only our pages.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class Server:
    """A running `sdmerge serve`: its URL, token (or None), folders and process."""

    url: str
    token: str | None
    data_dir: Path
    model_root: Path
    process: Process

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self) -> httpx.Client:
        """An HTTP client on the server, with the token when there is one."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30)

    def register_models(self, timeout: float = 60) -> list[dict]:
        """POST /models/scan, then wait until every registered model is hashed; returns them."""
        with self.client() as client:
            scanned = client.post("/models/scan")
            assert scanned.status_code == 200, scanned.text
            ids = [model["id"] for model in scanned.json()["registered"]]

            def ready() -> list[dict] | None:
                models = [client.get(f"/models/{i}").json() for i in ids]
                return models if all(m["status"] == "ready" for m in models) else None

            return wait_for(ready, timeout, "the scanned models to be hashed")


@contextmanager
def run_server(workdir: Path, model_root: Path, *, token: str | None = None, **env: str) -> Iterator[Server]:
    """`sdmerge serve` on a free loopback port with its data in workdir/data; stopped (with its
    worker) on exit. `env` adds SDMERGE_* settings (e.g. SDMERGE_JOB_LEASE_SECONDS="5")."""
    port = free_port()
    settings = {"SDMERGE_MERGE_THREADS": "1", "SDMERGE_HASH_CACHE": str(workdir / "hashes.sqlite3"), **env}
    if token:
        settings["SDMERGE_API_TOKEN"] = token
    data_dir = workdir / "data"
    process = Process([*SDMERGE, "serve", "--port", str(port), "--data-dir", str(data_dir),
                       "--model-root", str(model_root)], service_env(**settings), workdir / "serve.log")
    server = Server(f"http://127.0.0.1:{port}", token, data_dir, model_root, process)
    try:
        wait_healthy(server.url, process)
        yield server
    finally:
        status = process.stop()
        assert status in (0, -15), process.output()  # uvicorn re-raises the SIGTERM it handled


def chromium_path() -> str:
    """Debian's Chromium; a clear failure without it (a skip only when SDMERGE_TEST_ALLOW_SKIP=1)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = ("chromium is not installed: `make test` installs it (apt-get install -y chromium, as root); "
               "set SDMERGE_TEST_ALLOW_SKIP=1 to skip the browser tests")
    if os.environ.get("SDMERGE_TEST_ALLOW_SKIP") == "1":
        pytest.skip(message)
    pytest.fail(message)


@dataclass
class PageLog:
    """What a page did besides rendering: requests to anything but loopback (aborted: the app must
    need no internet), uncaught script errors, and console errors (a 401 a test asked for shows
    here too, so those are only recorded)."""

    offsite: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def attach(self, context) -> None:
        context.route("**/*", self._route)
        context.on("page", self._watch)

    def _watch(self, page) -> None:
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", lambda msg: msg.type == "error" and self.console.append(msg.text))

    def _route(self, route) -> None:
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or parts.hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.offsite.append(url)
            route.abort()


def screenshot(page, name: str, *, full_page: bool = True) -> Path:
    """Save the page as tests/browser/screenshots/NAME.png (ignored by git) and return the path."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
