"""First paint of every dashboard page with 1,000 models and 1,000 jobs, against the same pages
over an empty database in the same run (the baseline), in Debian's headless Chromium against a
real `sdmerge serve`.

For each page: `fcp` is the browser's first-contentful-paint, `ready` the page's own mark
(`sdmerge:ready:<page>`: its content and first data are in the DOM), both from navigation start,
medians of --repeat fresh loads.

    .venv/bin/python bench/dashboard_bench.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.browser.harness import CHROMIUM_ARGS, chromium_path, run_server  # noqa: E402
from tests.browser.test_dashboard import PAGES, open_page, seed_rows  # noqa: E402

FIGURES = """() => ({ready: performance.getEntriesByName(`sdmerge:ready:${document.body.dataset.ready}`)[0].startTime,
  fcp: (performance.getEntriesByName("first-contentful-paint")[0] || {}).startTime ?? null})"""


def measure(page, server, repeat: int) -> dict[str, dict[str, float]]:
    figures = {}
    for route in PAGES:
        runs = []
        for _ in range(repeat):
            open_page(page, server, route)
            runs.append(page.evaluate(FIGURES))
        figures[route] = {k: statistics.median(r[k] for r in runs) for k in ("fcp", "ready")}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as work, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        root = Path(work) / "models"
        root.mkdir()
        with run_server(Path(work), root) as server:
            empty = measure(page, server, args.repeat)
            seed_rows(server)
            full = measure(page, server, args.repeat)
        browser.close()
    print(f"{'page':10} {'fcp empty':>10} {'fcp 1000':>9} {'ratio':>6} {'ready empty':>12} {'ready 1000':>11} {'ratio':>6}")
    for route in PAGES:
        e, f = empty[route], full[route]
        print(f"{route:10} {e['fcp']:10.0f} {f['fcp']:9.0f} {f['fcp'] / e['fcp']:6.2f} "
              f"{e['ready']:12.0f} {f['ready']:11.0f} {f['ready'] / e['ready']:6.2f}")


if __name__ == "__main__":
    main()
