"""The web app as a person uses it: `vlm-adapters serve` on a tiny adapter, driven by a real headless
Chromium (Debian's `chromium`, installed by setup.sh) through Playwright, and by `gradio_client`.

What each test proves:
- test_a_person_uses_the_app_in_a_browser: an upload (PNG + DICOM) shows in the gallery; Classify
  shows the prediction, the probability bars and a row per image, with the numbers the library computes
  for the same file; clicking the second image selects it; Explain shows the library's heatmap overlay
  of that image (pixel for pixel, and not the bare image) with its label; a threshold of 1 gives "not
  sure"; Describe and Ask show the text the library generates; a non-image and an oversized upload are refused with a
  message naming the file.
- test_gradio_client_calls_the_same_endpoints: /classify, /explain, /describe and /ask answer over the API with
  the library's numbers and text; edited labels are the ones scored; bad input is an error with its reason.
- test_saved_folder_runs_as_a_space: save_pretrained(with_app=True) writes app.py, requirements.txt and
  a card a Space reads; `python app.py` in that folder serves the adapter from the folder itself.
- test_uploads_are_checked_with_the_library_image_checks / test_prediction_text_abstains: the checks
  behind the messages, without a server.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pydicom
import pytest
import torch
import yaml
from conftest import colour_image
from gradio_client import Client, handle_file
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from vlm_adapters import attach, load
from vlm_adapters.app import NOT_SURE, prediction_text, read_uploads

LABELS = ["red", "green", "blue"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 300  # imports + loading the adapter on a busy 2-core machine
STEP_MS = 120_000  # the longest one step of the page may take there (an upload decoded, a model call)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], log: Path, cwd: Path, port: int) -> subprocess.Popen:
    """Start a server process and wait until it answers HTTP on 127.0.0.1:port."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GRADIO_SERVER_PORT": str(port)}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"the server did not answer within {STARTUP_S} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, llm_dir, vit_dir) -> Path:
    model = attach(vit_dir, llm_dir)
    model.config.labels = list(LABELS)
    return Path(model.save_pretrained(tmp_path_factory.mktemp("space") / "colours", with_app=True))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(0)
    colour_image("red", rng, 64).save(root / "red.png")
    shutil.copy(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm", root / "CT_small.dcm")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes((root / "red.png").read_bytes()[:200])
    noise = rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "huge.png")  # ~2.4 MB of noise: over the 1 MB limit the server is given
    return {path.name: path for path in root.iterdir()}


@pytest.fixture(scope="module")
def server(adapter_dir, tmp_path_factory):
    """`vlm-adapters serve` as a user starts it, with a 1 MB upload limit."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    proc = start([sys.executable, "-m", "vlm_adapters.cli", "serve", "--adapter", str(adapter_dir),
                  "--port", str(port), "--max_upload_mb", "1"], log, REPO, port)
    yield f"http://127.0.0.1:{port}/", log
    stop(proc)


@pytest.fixture(scope="module")
def reference(adapter_dir):
    """The same adapter in this process, one thread like the server, for the numbers the app must show."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load(str(adapter_dir))
    torch.set_num_threads(threads)


@pytest.fixture
def page():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        expect.set_options(timeout=STEP_MS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(STEP_MS)
            yield page
        finally:
            browser.close()


def upload(page, *paths: Path) -> None:
    page.locator("#files input[type=file]").set_input_files([str(p) for p in paths])


def assert_heatmap_shown(shown: Image.Image, reference, path: Path, labels: list[str]) -> str:
    """`shown` is the library's overlay of `path` (not the bare image); returns the caption the app
    must show with it."""
    explanation = reference.explain(str(path), labels=labels)
    expected = np.asarray(explanation.overlay(), dtype=int)
    shown = np.asarray(shown.convert("RGB"), dtype=int)
    assert shown.shape == expected.shape
    assert np.abs(shown - expected).max() <= 1
    assert np.abs(shown - np.asarray(explanation.image, dtype=int)).max() > 30  # the heat is drawn
    return f"{path.name}: why {explanation.label} ({explanation.score:.1%}); red = regions that raised its score most"


def test_a_person_uses_the_app_in_a_browser(server, page, files, reference, tmp_path):
    url, log = server
    assert "Running on local URL:  http://127.0.0.1:" in log.read_text()  # localhost only, as told
    page.goto(url)
    expect(page.locator("#labels textarea")).to_have_value(", ".join(LABELS))  # the adapter's labels
    upload(page, files["red.png"], files["CT_small.dcm"])
    expect(page.locator("#gallery img")).to_have_count(2)

    page.click("#classify")
    expected = reference.classify([str(files["red.png"]), str(files["CT_small.dcm"])], LABELS)
    top, p = next(iter(expected[0].items()))
    expect(page.locator("#prediction textarea")).to_have_value(f"red.png: {top} ({p:.1%})")
    for label, prob in expected[0].items():  # the bars: every label with its percentage
        expect(page.locator("#probabilities")).to_contain_text(re.compile(rf"{label}\s+{round(prob * 100)}%"))
    for name, probs in zip(("red.png", "CT_small.dcm"), expected):  # the table: a row per image
        shown = re.escape(str(round(max(probs.values()), 4)))
        expect(page.locator("#table")).to_contain_text(re.compile(rf"{re.escape(name)}\s+.*\s{shown}"))

    page.locator("#gallery button:has(img)").nth(1).click()  # select the DICOM image
    top, p = next(iter(expected[1].items()))
    expect(page.locator("#prediction textarea")).to_have_value(f"CT_small.dcm: {top} ({p:.1%})")

    page.click("#explain")  # the heatmap of the selected (DICOM) image
    caption = page.locator("#explained textarea")
    expect(caption).to_have_value(re.compile(r"^CT_small\.dcm: why "))
    src = urllib.parse.urljoin(url, page.locator("#heatmap img").get_attribute("src"))
    with urllib.request.urlopen(src, timeout=30) as response:
        shown = Image.open(io.BytesIO(response.read()))
    expect(caption).to_have_value(assert_heatmap_shown(shown, reference, files["CT_small.dcm"], LABELS))

    page.locator("#threshold input[type=number]").fill("1")
    page.locator("#threshold input[type=number]").press("Enter")
    page.click("#classify")
    expect(page.locator("#prediction textarea")).to_have_value(re.compile(rf"^CT_small\.dcm: {NOT_SURE} "))

    page.click("#describe")
    expect(page.locator("#description textarea")).to_have_value(reference.describe(str(files["CT_small.dcm"])))
    page.fill("#question textarea", "What colour is the square?")
    page.click("#ask")
    answer = reference.describe(str(files["CT_small.dcm"]), prompt="What colour is the square?")
    expect(page.locator("#answer textarea")).to_have_value(answer)
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)

    page.goto(url)  # a fresh page: the bad uploads alone
    upload(page, files["notes.txt"])
    expect(page.locator(".toast-body").last).to_contain_text("notes.txt is not an image file (.txt)")
    upload(page, files["huge.png"])
    # Gradio itself refuses it before it reaches the disk (serve passes it the limit)
    expect(page.locator(".toast-body").last).to_contain_text('maximum allowed size of 1.0 Mb: "huge.png"')


def test_gradio_client_calls_the_same_endpoints(server, files, reference):
    client = Client(server[0], verbose=False)
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/classify", "/explain", "/describe", "/ask"}
    red = handle_file(str(files["red.png"]))
    bars, prediction, table, = client.predict([red], "red, blue", 0.0, api_name="/classify")
    expected = reference.classify(str(files["red.png"]), ["red", "blue"])
    assert {c["label"]: c["confidence"] for c in bars["confidences"]} == pytest.approx(expected, abs=1e-6)
    assert prediction.startswith("red.png: ") and table["data"][0][0] == "red.png"
    overlay, caption = client.predict([red], "red, blue", 0, api_name="/explain")
    assert caption == assert_heatmap_shown(Image.open(overlay), reference, files["red.png"], ["red", "blue"])
    assert client.predict([red], api_name="/describe") == reference.describe(str(files["red.png"]))
    question = "What is in the picture?"
    assert client.predict([red], question, api_name="/ask") == reference.describe(str(files["red.png"]),
                                                                                  prompt=question)
    for upload_, labels, message in (
        (files["broken.png"], "red", "broken.png: the image is truncated or corrupt"),
        (files["notes.txt"], "red", "notes.txt is not an image file"),
        (files["red.png"], " , ", "Enter at least one label"),
        (files["red.png"], "red, red", "red appear more than once"),
    ):
        with pytest.raises(Exception, match=re.escape(message)):
            client.predict([handle_file(str(upload_))], labels, 0.0, api_name="/classify")


def test_saved_folder_runs_as_a_space(adapter_dir, files, reference, tmp_path):
    assert (adapter_dir / "requirements.txt").read_text().startswith("vlm-adapters[app]>=")
    card = yaml.safe_load((adapter_dir / "README.md").read_text().split("---")[1])
    assert card["sdk"] == "gradio" and card["app_file"] == "app.py"
    space = tmp_path / "space"
    shutil.copytree(adapter_dir, space)  # the Space's own copy of the folder, elsewhere
    port = free_port()
    proc = start([sys.executable, "app.py"], tmp_path / "space.log", space, port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            title = json.load(response)["title"]
        bars, prediction, _ = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            [handle_file(str(files["red.png"]))], ", ".join(LABELS), 0.0, api_name="/classify")
    finally:
        stop(proc)
    assert title == "colours (vlm_adapters)" and prediction.startswith("red.png: ")
    assert {c["label"]: c["confidence"] for c in bars["confidences"]} == pytest.approx(
        reference.classify(str(files["red.png"]), LABELS), abs=1e-6)


def test_uploads_are_checked_with_the_library_image_checks(files):
    assert [name for name, _ in read_uploads([str(files["red.png"]), str(files["CT_small.dcm"])], 1.0)] == [
        "red.png", "CT_small.dcm"]
    cases = [
        ([files["huge.png"]], "huge.png is 2."),
        ([files["notes.txt"], files["broken.png"]], "notes.txt is not an image file (.txt); upload .png"),
        ([files["broken.png"]], "broken.png: the image is truncated or corrupt"),
        ([], "Upload one or more images first."),
    ]
    for paths, message in cases:
        with pytest.raises(gr.Error, match=re.escape(message)):
            read_uploads([str(p) for p in paths], 1.0)
    with pytest.raises(gr.Error, match="notes.txt is not an image.*broken.png: the image is truncated"):
        read_uploads([str(files["notes.txt"]), str(files["broken.png"])], 1.0)  # every problem named at once


def test_prediction_text_abstains():
    probs = {"red": 0.55, "green": 0.45}
    assert prediction_text(probs, 0.0) == "red (55.0%)"
    assert prediction_text(probs, 0.6) == f"{NOT_SURE} (top label red at 55.0% is below 60%)"
