"""The API docs in a real browser: Swagger UI (/docs) and ReDoc (/redoc) render every operation of
our OpenAPI 3.1 document from the vendored assets, reach nothing beyond loopback, and work with an
API token: the pages load without one, and Swagger's Authorize makes "Try it out" calls with it."""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

from playwright.sync_api import expect

from tests.browser.harness import screenshot

SWAGGER_OPERATION = '.opblock.opblock-{method}:has(.opblock-summary-path[data-path="{path}"])'
REDOC_OPERATION = 'button:has(.http-verb.{method}):has(span:text-is("{path}"))'


def open_swagger(page, server) -> None:
    page.goto(f"{server.url}/docs")
    page.locator(".opblock").first.wait_for()
    assert "Unable to render" not in page.content()
    assert page.locator(".version-stamp, .version", has_text="OAS 3.1").first.is_visible()


def swagger_operation(page, method: str, path: str):
    return page.locator(SWAGGER_OPERATION.format(method=method, path=path))


def test_swagger_ui_renders_every_operation(server, page, page_log):
    open_swagger(page, server)
    submit = swagger_operation(page, "post", "/merges")
    assert submit.is_visible()
    assert submit.locator(".opblock-summary-method").inner_text() == "POST"
    spec = page.evaluate("fetch('/openapi.json').then(r => r.json())")
    operations = sum(len(methods) for methods in spec["paths"].values())
    assert page.locator(".opblock").count() == operations
    assert page.locator(".btn.authorize").is_visible()  # the spec declares the bearer scheme
    assert not [m for m in page_log.console if "Content Security Policy" in m]
    screenshot(page, "docs-swagger")


def test_redoc_renders_every_operation(server, page, page_log):
    page.goto(f"{server.url}/redoc")
    submit = page.locator(REDOC_OPERATION.format(method="post", path="/merges"))
    submit.wait_for()
    assert page.get_by_role("heading", name="sdmerge (", exact=False).first.is_visible()
    assert "Unable to render" not in page.content() and "Something went wrong" not in page.content()
    assert page.locator("li[data-item-id*='/operation/'][role=menuitem]").count() >= 30
    # ReDoc's sidebar logo comes from its CDN: the page's policy stops it before any request
    assert page_log.offsite == []
    blocked = [m for m in page_log.console if "Content Security Policy" in m]
    assert all("cdn.redoc.ly" in m for m in blocked), blocked
    screenshot(page, "docs-redoc", full_page=False)


def test_docs_with_a_token_load_and_authorise_try_it_out(token_server, page, page_log):
    server = token_server
    open_swagger(page, server)  # the page, its assets and /openapi.json need no token
    fetch = "([path, headers]) => fetch(path, {headers}).then(r => r.status)"
    assert page.evaluate(fetch, ["/models", {}]) == 401
    assert page.evaluate(fetch, ["/models", server.headers]) == 200

    models = swagger_operation(page, "get", "/models")
    models.locator(".opblock-summary-control").click()
    models.get_by_role("button", name="Try it out").click()
    models.get_by_role("button", name="Execute").click()
    expect(_response_status(models)).to_have_text("401")  # not authorised yet

    page.locator(".btn.authorize").first.click()
    dialog = page.locator(".modal-ux")
    dialog.locator("input").fill(server.token)
    dialog.locator("button.modal-btn.authorize").click()
    expect(dialog.locator(".auth-container")).to_contain_text("Authorized")
    dialog.locator("button.btn-done").click()
    models.get_by_role("button", name="Execute").click()
    expect(_response_status(models)).to_have_text("200")
    assert f"Authorization: Bearer {server.token}" in models.locator(".curl").inner_text()
    screenshot(page, "docs-swagger-authorised")

    page.goto(f"{server.url}/redoc")
    page.locator(REDOC_OPERATION.format(method="post", path="/merges")).wait_for()


def test_the_open_docs_prefix_does_not_open_the_api(token_server):
    """/vendor/ is open to anyone: a raw, un-normalised path under it never reaches a route.

    The token check refuses a path under an open prefix that holds ``..`` (401), and the static
    mount finds nothing for the rest (404); neither answers with the API's data.
    """
    parts = urlsplit(token_server.url)
    for path in ("/vendor/../models", "/vendor/%2e%2e/models", "/vendor//models"):
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        assert response.status in (401, 404) and b"items" not in body, (path, response.status, body)


def _response_status(operation):
    return operation.locator(".live-responses-table td.response-col_status:not(.col_header)")
