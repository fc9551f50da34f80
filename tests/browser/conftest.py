"""Browser fixtures: a real `sdmerge serve` over tiny SD-shaped checkpoints (with or without an
API token), headless Chromium (Debian's, driven by Playwright), a fresh page per test that may not
reach anything but loopback. `tests.browser.harness.screenshot(page, name)` saves a PNG into
tests/browser/screenshots/; `run_server` starts a server of a test's own (other settings).

Without Chromium these tests fail with a message saying how to install it (`make test` does, as
root); SDMERGE_TEST_ALLOW_SKIP=1 makes them skip instead, as it does for the PostgreSQL tests.
"""

from __future__ import annotations

import pytest

from tests.browser.harness import CHROMIUM_ARGS, PageLog, Server, chromium_path, run_server

TOKEN = "browser-s3cret"
MODELS = (("sd2-1", "sd2", 1), ("sd2-2", "sd2", 2), ("sd2-3", "sd2", 3), ("sd1-1", "sd1", 1))


@pytest.fixture(scope="session")
def browser_models(tmp_path_factory):
    """Tiny checkpoints written once per session: sd2-1, sd2-2, sd2-3 and sd1-1 (.safetensors)."""
    from merge_engine.synthetic import tiny_state_dict, write_checkpoint

    folder = tmp_path_factory.mktemp("browser-models")
    for name, architecture, seed in MODELS:
        write_checkpoint(folder / f"{name}.safetensors", tiny_state_dict(architecture, seed=seed))
    return folder


@pytest.fixture
def model_root(tmp_path, browser_models):
    """A model root of this test's own, holding hard links to the session's checkpoints."""
    root = tmp_path / "models"
    root.mkdir()
    for path in browser_models.iterdir():
        (root / path.name).hardlink_to(path)
    return root


@pytest.fixture
def server(tmp_path, model_root) -> Server:
    """`sdmerge serve` (embedded) with no token, its models not yet registered."""
    with run_server(tmp_path, model_root) as running:
        yield running


@pytest.fixture
def token_server(tmp_path, model_root) -> Server:
    """`sdmerge serve` (embedded) with SDMERGE_API_TOKEN set (server.token, server.headers)."""
    with run_server(tmp_path, model_root, token=TOKEN) as running:
        yield running


@pytest.fixture(scope="session")
def browser():
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page_log() -> PageLog:
    return PageLog()


@pytest.fixture
def page(browser, page_log):
    """A fresh page in a fresh context (no cookies, no storage). At the end, the test fails if the
    page tried to reach anything but loopback or threw an uncaught error; a test expecting an
    error clears page_log.errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    page_log.attach(context)
    opened = context.new_page()
    yield opened
    context.close()
    assert page_log.offsite == [], f"the page reached beyond loopback: {page_log.offsite}"
    assert page_log.errors == [], f"uncaught errors in the page: {page_log.errors}"
