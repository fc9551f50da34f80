"""The dashboard end to end in headless Chromium against a real `sdmerge serve` (embedded: SQLite,
filesystem broker, child worker) over tiny SD-shaped checkpoints: the registry, a merge from the
editor to its downloaded artifact, messages at the field at fault, A1111 metadata converted, a
preview and two images compared, a study from its first round to the merged picks, an analysis
heatmap, the token asked for once and carried by every call, and every page with 1,000 models and
1,000 jobs in the database. Each page is saved as a screenshot (tests/browser/screenshots/).

First paint is measured here and written to screenshots/first-paint.json, not asserted (timing is
the benchmarks' business: bench/dashboard_bench.py records it against an empty database).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import httpx

from tests.browser.harness import SCREENSHOTS, screenshot
from tests.service.servers import wait_for

PAGES = ("models", "merge", "jobs", "previews", "studies", "analyses")


def open_page(page, server, route: str) -> None:
    """Open /ui/#/<route> as a fresh document and wait until the page says it is on screen."""
    page.goto("about:blank")
    page.goto(f"{server.url}/ui/#/{route}")
    page.wait_for_selector(f"body[data-ready='{route.split('/')[0]}']")


def set_editor(page, value: dict | str, selector: str = ".editor textarea") -> None:
    text = value if isinstance(value, str) else json.dumps(value, indent=2)
    page.locator(selector).first.fill(text)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- Models ------------------------------------------------------------------------------------------

def test_register_scan_upload_and_a_models_details(server, page, tmp_path):
    open_page(page, server, "models")
    page.fill("input[name=path]", "sd2-1.safetensors")
    page.fill("input[name=name]", "first")
    page.click("form button[type=submit]")
    page.get_by_text("Registered first.").wait_for()

    page.get_by_role("button", name="Scan the model roots").click()
    page.get_by_text(re.compile(r"Scan: 3 registered")).wait_for()  # sd2-1 is registered already
    page.wait_for_function("document.querySelectorAll('table.data tbody tr').length === 4")
    page.wait_for_function("[...document.querySelectorAll('table.data tbody tr')].every("
                           "(tr) => tr.textContent.includes('ready'))", timeout=60_000)
    rows = page.locator("table.data tbody tr")
    first = rows.filter(has_text="first")
    first.get_by_text("unet, text_encoder, vae").or_(first.get_by_text("text_encoder, unet, vae")).wait_for()

    # the filter and the sort
    page.fill("input[type=search]", "sd2")
    page.get_by_text("2 of 4 models").wait_for()
    page.fill("input[type=search]", "")
    page.select_option("select[aria-label=architecture]", "sd1")
    page.get_by_text("1 of 4 models").wait_for()
    page.select_option("select[aria-label=architecture]", "")
    page.click("th[data-key=size]")
    page.click("th[data-key=size]")  # largest first: an sd2 model, then sd1 last
    assert "sd1-1" in rows.last.inner_text()

    # an upload, with its progress bar to the end
    from merge_engine.synthetic import tiny_state_dict, write_checkpoint

    upload = tmp_path / "uploaded.safetensors"
    write_checkpoint(upload, tiny_state_dict("sd1", seed=7))
    page.set_input_files("input[type=file]", str(upload))
    page.get_by_role("button", name="Upload", exact=True).click()
    page.get_by_text("Uploaded uploaded.safetensors.").wait_for()
    assert page.locator(".progress").last.get_attribute("aria-valuenow") == "100"
    screenshot(page, "models")

    # a model's details: components, hashes, lineage of a merge
    with server.client() as client:
        models = {m["name"]: m for m in wait_for(lambda: _all_ready(client), 60, "the upload to be hashed")}
        created = client.post("/merges", json={"name": "lineage", "merge": {"method": "uniform", "models": [
            "first", "sd2-2.safetensors"]}}).json()
        job = wait_for(lambda: _finished(client, created["id"]), 120, "the merge")
        assert job["status"] == "succeeded", job
        client.post("/models", json={"path": str(_artifact_file(server, job)), "name": "merged"})
        merged = wait_for(lambda: _ready(client, "merged"), 60, "the merged model to be hashed")
    open_page(page, server, f"models/{models['first']['id']}")
    page.get_by_text(models["first"]["sha256"]).first.wait_for()
    page.get_by_text(models["first"]["blake3"]).first.wait_for()
    page.get_by_text(models["first"]["civitai"]["AutoV3"]).first.wait_for()  # as Civitai shows it
    page.get_by_text("text_encoder").first.wait_for()
    open_page(page, server, f"models/{merged['id']}")
    lineage = page.locator("#lineage")
    lineage.get_by_role("link", name="first").wait_for()  # the input, linked to its registry row
    lineage.get_by_role("link", name="sd2-2.safetensors").wait_for()
    assert lineage.locator("ul.lineage ul > li", has_text="× 1/2").count() == 2  # each input's weight
    screenshot(page, "model-detail")
    open_page(page, server, "models")
    page.fill("input[type=search]", models["first"]["civitai"]["CRC32"])  # a hash pasted from Civitai
    page.wait_for_function("document.querySelectorAll('table.data tbody tr').length === 1")


def _all_ready(client: httpx.Client) -> list[dict] | None:
    items = client.get("/models").json()["items"]
    return items if items and all(m["status"] == "ready" for m in items) else None


def _ready(client: httpx.Client, name: str) -> dict | None:
    found = [m for m in client.get("/models").json()["items"] if m["name"] == name]
    return found[0] if found and found[0]["status"] != "hashing" else None


def _finished(client: httpx.Client, job_id: int, kind: str = "merges") -> dict | None:
    job = client.get(f"/{kind}/{job_id}").json()
    return job if job["status"] not in ("queued", "running") else None


def _artifact_file(server, job: dict) -> Path:
    """Where the artifact lies: a copy under the model root, since a model path must be in it."""
    with server.client() as client:
        data = client.get(job["artifact"]["url"]).content
    path = server.model_root / "merged.safetensors"
    path.write_bytes(data)
    return path


# -- New merge ----------------------------------------------------------------------------------------

def test_a_merge_from_the_editor_to_its_downloaded_artifact(server, page, tmp_path):
    server.register_models()
    open_page(page, server, "merge")
    recipe = {"name": "editor-mix", "merge": {"method": "weighted", "models": [
        {"model": "sd2-1.safetensors", "weight": 2}, {"model": "sd2-2.safetensors", "weight": 1}]}}
    set_editor(page, recipe)
    page.click("#plan")
    weights = page.locator("#plan-weights")
    weights.wait_for()
    assert weights.get_by_text("2/3").count() >= 1 and weights.get_by_text("1/3").count() >= 1
    page.click("#submit")
    card = page.locator("#merge-job .card[data-status=succeeded]")
    card.wait_for(timeout=120_000)
    assert card.locator(".progress").get_attribute("aria-valuenow") == "100"
    assert "100%" in card.inner_text()
    screenshot(page, "merge")

    sha = card.locator("code.sha256").inner_text()
    with page.expect_download() as caught:
        card.locator("a.download").click()
    downloaded = tmp_path / "downloaded.safetensors"
    caught.value.save_as(downloaded)
    assert sha256_of(downloaded) == sha
    with server.client() as client:
        job_id = int(card.get_attribute("data-id"))
        assert client.get(f"/merges/{job_id}").json()["artifact"]["sha256"] == sha


def test_validation_messages_sit_at_the_field_at_fault(server, page):
    server.register_models()
    open_page(page, server, "merge")
    lines = ['{', '  "name": "bad",', '  "merge": {', '    "method": "uniform",', '    "models": [',
             '      "sd2-1.safetensors",', '      "no-such-model"', '    ]', '  }', '}']
    set_editor(page, "\n".join(lines))
    page.click("#plan")
    marked = page.locator(".field-error[data-line='7']")
    marked.wait_for()
    assert "no-such-model" in marked.inner_text()

    lines[3] = '    "method": "average",'
    lines[6] = '      "sd2-2.safetensors"'
    set_editor(page, "\n".join(lines))
    page.click("#plan")
    marked = page.locator(".field-error[data-line='4']")
    marked.wait_for()
    assert "method" in marked.inner_text()
    assert page.locator(".field-error").count() == 1

    set_editor(page, '{"merge": {"method": "uniform", "models": [}')
    page.click("#submit")
    page.locator(".field-error[data-line='1']").get_by_text("not valid JSON").wait_for()
    screenshot(page, "merge-error")
    with server.client() as client:
        assert client.get("/merges").json()["items"] == []  # nothing was submitted


def test_a1111_metadata_is_converted_to_an_exact_recipe(server, page):
    models = {m["name"]: m for m in server.register_models()}
    a, b = models["sd2-1.safetensors"], models["sd2-2.safetensors"]
    recipe = {"type": "webui", "primary_model_hash": a["sha256"], "secondary_model_hash": b["sha256"],
              "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.3,
              "save_as_half": True, "custom_name": "webui-mix", "config_source": 0, "bake_in_vae": "None",
              "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    pasted = {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps({
        a["sha256"]: {"name": a["name"], "legacy_hash": a["legacy_hash"], "sd_merge_recipe": None},
        b["sha256"]: {"name": b["name"], "legacy_hash": b["legacy_hash"], "sd_merge_recipe": None}})}
    open_page(page, server, "merge")
    page.fill("textarea[aria-label='A1111 metadata']", json.dumps(pasted))
    page.click("#convert")
    page.get_by_text("Converted:").wait_for()
    converted = json.loads(page.locator(".editor textarea").input_value())
    assert converted["name"] == "webui-mix"
    weights = page.locator("#plan-weights")
    assert weights.get_by_text("7/10").count() >= 1 and weights.get_by_text("3/10").count() >= 1


# -- Jobs -----------------------------------------------------------------------------------------------

def test_jobs_are_live_with_downloads_errors_and_cancel(server, page):
    server.register_models()
    with server.client() as client:
        done = client.post("/merges", json={"merge": {"method": "uniform", "models": [
            "sd2-1.safetensors", "sd2-3.safetensors"]}}).json()
        wait_for(lambda: _finished(client, done["id"]), 120, "the merge")
    open_page(page, server, "jobs")
    row = page.locator(f"#jobs-merges tr[data-id='{done['id']}'][data-status=succeeded]")
    row.wait_for()
    with server.client() as client:
        artifact = client.get(f"/merges/{done['id']}").json()["artifact"]
    assert row.locator("code.sha256").inner_text() == artifact["sha256"]
    assert row.locator("a.download").get_attribute("href") == artifact["url"]

    # a failure shows its error in full; a new job appears by itself (the page polls)
    with server.client() as client:
        failing = client.post("/merges", json={"merge": {"method": "uniform", "models": [
            "sd2-1.safetensors", "sd1-1.safetensors"]}})
    assert failing.status_code == 422  # mixed architectures are refused before any job exists
    with server.client() as client:
        queued = client.post("/analyses", json={"models": ["sd2-1.safetensors", "sd2-2.safetensors"]}).json()
    page.locator(f"#jobs-analyses tr[data-id='{queued['id']}']").wait_for()
    page.locator(f"#jobs-analyses tr[data-id='{queued['id']}'][data-status=succeeded]").wait_for(timeout=120_000)
    screenshot(page, "jobs")


# -- Previews -----------------------------------------------------------------------------------------

def test_a_preview_fills_in_and_two_images_are_compared(server, page):
    server.register_models()
    open_page(page, server, "previews")
    for name in ("sd2-1.safetensors", "sd2-2.safetensors"):
        page.check(f"input[name=target][value='{name}']")
    page.fill("textarea[name=prompts]", "a red cube")
    page.fill("input[name=seeds]", "3, 4")
    page.fill("input[name=steps]", "2")
    page.fill("input[name=width]", "64")
    page.fill("input[name=height]", "64")
    page.click("#preview-submit")
    page.wait_for_selector("#preview-images")
    page.wait_for_function("document.querySelectorAll('#preview-images td[data-state=ready]').length === 4",
                           timeout=180_000)
    page.locator("#preview-images td[data-index='0'] img").click()
    infotext = page.locator("#viewer-infotext")
    infotext.wait_for()
    wait_for(lambda: "Steps: 2" in infotext.inner_text(), 30, "the infotext")
    page.locator("#preview-images td[data-index='1'] img").click(modifiers=["Shift"])
    page.locator("#preview-images td[data-index='2'] img").click(modifiers=["Shift"])
    compare = page.locator("#compare[data-mode=swipe]")
    compare.wait_for()
    page.locator("#compare-slider").fill("20")
    page.click("#compare button[data-mode=blink]")
    page.locator("#compare[data-mode=blink]").wait_for()
    screenshot(page, "previews")


# -- Studies ------------------------------------------------------------------------------------------

def test_a_study_round_picks_and_the_merged_final_recipe(server, page):
    server.register_models()
    open_page(page, server, "studies")
    for name in ("sd2-1.safetensors", "sd2-2.safetensors", "sd2-3.safetensors"):
        page.check(f"input[name=candidate][value='{name}']")
    page.fill("input[name=name]", "browser-study")
    page.fill("textarea[name=topics]", "a red cube")
    page.fill("input[name=steps]", "2")
    page.fill("input[name=width]", "64")
    page.fill("input[name=height]", "64")
    page.click("#study-form button[type=submit]")
    page.wait_for_selector("#next-round")

    page.click("#next-round button[data-kind=raw]")
    raw = page.locator(".card.round[data-number='1'][data-status=succeeded]")
    raw.wait_for(timeout=180_000)
    page.wait_for_function("[...document.querySelectorAll(\".card.round[data-number='1'] img\")]"
                           ".every((img) => img.complete && img.naturalWidth === 64)")
    raw.locator("th.column[data-candidate='sd2-1.safetensors']").click()
    raw.locator("td[data-column='3']").first.click()  # a cell picks its column too: sd2-3
    assert raw.locator("strong.picks").inner_text() == "sd2-1.safetensors, sd2-3.safetensors"
    raw.locator("button.save-picks").click()
    page.locator("#selection td[data-role=Kept]").get_by_text("sd2-1.safetensors, sd2-3.safetensors").wait_for()
    screenshot(page, "study-round")

    # the picks carried into the next round: one column per kept candidate's text encoder
    page.click("#next-round button[data-kind=text_encoder]")
    te = page.locator(".card.round[data-number='2'][data-kind=text_encoder][data-status=succeeded]")
    te.wait_for(timeout=180_000)
    assert [t.strip() for t in te.locator("th.column").all_inner_texts()] == [
        "TE: sd2-1.safetensors", "TE: sd2-3.safetensors"]
    te.locator("th.column[data-candidate='sd2-3.safetensors']").click()
    te.locator("button.save-picks").click()
    page.locator("#selection td[data-role='Text encoders']").get_by_text("sd2-3.safetensors").wait_for()

    final = page.locator("#final pre")
    wait_for(lambda: '"text_encoder"' in final.inner_text(), 30, "the final recipe to carry the picks")
    page.click("#merge-final")
    page.locator("#study-merge[data-status=succeeded]").wait_for(timeout=120_000)
    screenshot(page, "study-merged")
    with server.client() as client:
        study = client.get("/studies").json()["items"][0]
        merge_id = client.get(f"/studies/{study['id']}").json()["merge"]
        job = client.get(f"/merges/{merge_id}").json()
        metadata = client.get(f"/artifacts/{job['artifact']['id']}/metadata").json()
    assert json.loads(metadata["sdmerge_study"])["selection"]["text_encoders"] == ["sd2-3.safetensors"]


# -- Analyses -----------------------------------------------------------------------------------------

def test_an_analysis_heatmap_and_its_models(server, page):
    models = {m["name"]: m for m in server.register_models()}
    open_page(page, server, "analyses")
    for name in ("sd2-1.safetensors", "sd2-2.safetensors", "sd2-3.safetensors"):
        page.check(f"label.model input[value='{name}']")
    page.click("#analysis-submit")
    heatmap = page.locator("img.heatmap[data-component=unet][data-metric=l2]")
    heatmap.wait_for(timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('img.heatmap')].every("
                           "(img) => img.complete && img.naturalWidth > 0)")
    assert page.locator("img.map").count() >= 1
    screenshot(page, "analysis")
    page.locator("a.model-link", has_text="sd2-2.safetensors").first.click()
    page.wait_for_selector("body[data-ready=models]")
    page.get_by_text(models["sd2-2.safetensors"]["sha256"]).first.wait_for()


# -- the token ------------------------------------------------------------------------------------------

API_PREFIXES = ("/models", "/merges", "/previews", "/analyses", "/studies", "/artifacts", "/openapi.json")


def test_with_a_token_the_app_asks_once_and_every_call_carries_it(token_server, page, page_log):
    token_server.register_models()
    with token_server.client() as client:
        job = client.post("/merges", json={"merge": {"method": "uniform", "models": [
            "sd2-1.safetensors", "sd2-2.safetensors"]}}).json()
        job = wait_for(lambda: _finished(client, job["id"]), 120, "the merge")
    calls = []
    page.on("request", lambda request: calls.append(request))

    page.goto(f"{token_server.url}/ui/#/models")
    dialog = page.locator("#token-dialog[open]")
    dialog.wait_for()
    screenshot(page, "token")
    page.fill("#token-input", "wrong")
    page.click("#token-form button[type=submit]")
    page.get_by_text("That token was refused").wait_for()
    page.fill("#token-input", token_server.token)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("body[data-ready=models]")
    page_log.console.clear()  # the two 401s before the token was known

    asked = len(calls)
    for route in PAGES:
        page.click(f"#nav a[data-page={route}]")
        page.wait_for_selector(f"body[data-ready={route}]")
    page.reload()  # the tab keeps its token: no question again
    page.wait_for_selector("body[data-ready=analyses]")
    assert page.locator("#token-dialog[open]").count() == 0
    page.click("#nav a[data-page=jobs]")
    row = page.locator(f"#jobs-merges tr[data-id='{job['id']}'] a.download")
    with page.expect_download() as caught:
        row.click()
    assert caught.value.failure() is None

    api_calls = [c for c in calls[asked:] if re.match(r"https?://[^/]+(/[^?]*)", c.url).group(1).startswith(API_PREFIXES)]
    assert len(api_calls) > 10
    for call in api_calls:
        headers = call.all_headers()
        if call.resource_type in ("fetch", "xhr"):
            assert headers.get("authorization") == f"Bearer {token_server.token}", call.url
        else:  # an image or a download: the tab's SameSite=Strict cookie
            assert f"sdmerge_token={token_server.token}" in headers.get("cookie", ""), call.url
    assert not [c for c in calls[asked:] if c.failure or (c.response() and c.response().status == 401)]


# -- a big registry ------------------------------------------------------------------------------------

def seed_rows(server, models: int = 1000, jobs: int = 1000) -> None:
    """Rows straight into the server's database: ready models and finished merge jobs."""
    from sqlalchemy import create_engine, insert

    from app.models import Job, Model

    engine = create_engine(f"sqlite:///{server.data_dir / 'sdmerge.db'}")
    components = {"unet": {"keys": 686}, "text_encoder": {"keys": 196}, "vae": {"keys": 248}}
    statuses = ("succeeded", "failed", "cancelled")
    with engine.begin() as connection:
        connection.execute(insert(Model), [{
            "name": f"seeded-{i:04d}.safetensors", "path": f"/nowhere/seeded-{i:04d}.safetensors",
            "size": 2_000_000_000 + i, "mtime_ns": i, "status": "ready", "architecture": ("sd1", "sd2", "sdxl")[i % 3],
            "components": components, "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
            "autov3": hashlib.sha256(f"v3-{i}".encode()).hexdigest()} for i in range(models)])
        connection.execute(insert(Job), [{
            "name": f"seeded-mix-{i}", "recipe": {"merge": {"method": "uniform", "models": ["a", "b"]}},
            "recipe_hash": hashlib.sha256(f"job-{i}".encode()).hexdigest(), "status": statuses[i % 3],
            "error": {"code": "seeded", "message": "seeded failure"} if i % 3 == 1 else None}
            for i in range(jobs)])
    engine.dispose()


def test_every_page_with_1000_models_and_1000_jobs(server, page):
    seed_rows(server)
    figures = {}
    for route in PAGES:
        open_page(page, server, route)
        figures[route] = page.evaluate(f"""() => ({{
            ready_ms: performance.getEntriesByName("sdmerge:ready:{route}")[0].startTime,
            first_contentful_paint_ms: (performance.getEntriesByName("first-contentful-paint")[0] || {{}}).startTime ?? null,
        }})""")
        screenshot(page, f"big-{route}", full_page=False)
    open_page(page, server, "models")
    page.get_by_text("1000 of 1000 models").wait_for()
    open_page(page, server, "jobs")
    assert page.locator("#jobs-merges tbody tr").count() >= 50
    SCREENSHOTS.mkdir(exist_ok=True)
    (SCREENSHOTS / "first-paint.json").write_text(json.dumps(figures, indent=2) + "\n")
    print("first paint with 1000 models and 1000 jobs (ms):", figures)
