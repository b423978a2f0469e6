"""Take docs/app.png: the web app on the demo's adapter (run `vlm-adapters demo` first), driven by a
headless Chromium as the browser test drives it: three Fashion-MNIST test images uploaded,
classified, the second one selected, explained (heatmap), described and asked about.

    .venv/bin/python benchmarks/record_app_screenshot.py [--adapter runs/demo/adapter] [--output docs/app.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from vlm_adapters import load  # noqa: E402
from vlm_adapters.app import build_app  # noqa: E402
from vlm_adapters.demo.assets import fashion_mnist  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
PICKS = (0, 7, 9)  # three of the ten test images drawn (one per class)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="runs/demo/adapter")
    parser.add_argument("--output", default="docs/app.png")
    parser.add_argument("--question", default="What kind of clothing is this?")
    parser.add_argument("--abstain_below", default="0.9")
    args = parser.parse_args()

    model = load(args.adapter)  # the demo's adapter names both its bases
    test = fashion_mnist("test", per_class=1, seed=0)
    demo = build_app(model, title="Fashion-MNIST adapter (vlm_adapters demo)")
    demo.queue().launch(prevent_thread_lock=True, server_port=None, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in PICKS:
            row = test[i]
            path = os.path.join(tmp, f"{test.features['label'].int2str(row['label']).replace('/', '-')}.png")
            row["image"].resize((112, 112)).save(path)
            paths.append(path)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(demo.local_url)
            page.locator("#files input[type=file]").set_input_files(paths)
            expect(page.locator("#gallery img")).to_have_count(len(paths), timeout=60_000)
            page.locator("#threshold input[type=number]").fill(args.abstain_below)
            page.locator("#threshold input[type=number]").press("Enter")
            page.click("#classify")
            expect(page.locator("#prediction textarea")).not_to_have_value("", timeout=300_000)
            page.locator("#gallery button:has(img)").nth(1).click()
            page.click("#explain")
            expect(page.locator("#explained textarea")).not_to_have_value("", timeout=300_000)
            page.click("#describe")
            expect(page.locator("#description textarea")).not_to_have_value("", timeout=300_000)
            page.fill("#question textarea", args.question)
            page.click("#ask")
            expect(page.locator("#answer textarea")).not_to_have_value("", timeout=300_000)
            page.screenshot(path=args.output, full_page=True)
            browser.close()
    demo.close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
