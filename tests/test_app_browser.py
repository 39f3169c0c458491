"""End to end in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright; never downloaded).

Starts ``app.py`` as a subprocess on a free local port with tiny settings (no warm start, 32 records), then as a
first-time user would: runs the default fine-tune and reads it against chance and the measured non-private
reference; from a second page, queues a fine-tune behind a running one, sees its place in line, cancels it and sees
that it never started; compares the runs, pins one, exports the CSV and loads it in the privacy–utility tab; sets ε
and the prune ratios for a short run; triggers a bad input; opens the visual tokens view. Screenshots go to
``artifacts/`` (gitignored).
"""
from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.dashboard.common import TOAST_TEXT

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
START_TIMEOUT_S = 120
SERVER: dict = {}   # what the tests need to know of the served app (its temporary folder)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_contact():
    """benchmarks/first_contact.py (its server wait is this test's too)."""
    spec = importlib.util.spec_from_file_location("first_contact", ROOT / "benchmarks" / "first_contact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The dashboard served by a subprocess; stopped (terminate, then kill) when the module's tests end."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (`make chromium`) to run the browser test")
    pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")
    ARTIFACTS.mkdir(exist_ok=True)
    port = _free_port()
    env = dict(os.environ, DUALPRIV_APP_WARM_START_STEPS="0", DUALPRIV_APP_BENCH_ISOLATE="0",
               DUALPRIV_CACHE=str(tmp_path_factory.mktemp("cache")), DUALPRIV_APP_TRAIN_LIMIT="32",
               DUALPRIV_APP_EVAL_LIMIT="32", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio")), GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1")
    SERVER["temp"] = Path(env["GRADIO_TEMP_DIR"])
    log = open(ARTIFACTS / "app_browser_server.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port),
                             "--max-steps", "20", "--time-limit", "120"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        try:
            _first_contact().wait_for_server(url, proc, START_TIMEOUT_S)
        except RuntimeError as err:
            raise RuntimeError(f"{err}; see {ARTIFACTS / 'app_browser_server.log'}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _open(browser, url):
    """A new page (its own Gradio session) on the dashboard."""
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    tab.set_default_timeout(30_000)
    tab.goto(url)
    tab.wait_for_selector("#ft-run")
    return tab


@pytest.fixture(scope="module")
def page(browser, app_url):
    return _open(browser, app_url)


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def test_default_run_is_read_against_chance_and_a_measured_reference(page):
    from playwright.sync_api import expect

    for element in ("#ft-run", "#ft-cancel", "#ft-status"):   # the actions and the status on the first screen
        box = page.locator(element).bounding_box()
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= 1000, (element, box)
    page.screenshot(path=str(ARTIFACTS / "app_first_screen.png"), full_page=False)
    started = time.monotonic()
    page.locator("#ft-run").click()
    expect(page.locator("#ft-run")).to_be_disabled()  # no second click on one's own running job
    verdict = page.locator("#ft-verdict")
    expect(page.locator("#ft-result")).to_contain_text("accuracy", timeout=150_000)  # the result, at once
    expect(verdict).to_contain_text("chance 50.0% (2 answers), majority class")
    expect(verdict).to_contain_text("Non-private reference, same", timeout=150_000)  # then its reference
    text = verdict.inner_text()
    # 32 test images on an untrained model: the note must say whether the result is noise
    assert "chance 50.0%" in text and "of 32 test records" in text, text
    assert "measured live just now" in text, text
    expect(page.locator("#ft-run")).to_be_enabled()
    page.locator("#ft-verdict").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "app_default_run.png"), full_page=True)
    print(f"default fine-tune + its non-private reference in the browser: {time.monotonic() - started:.1f} s")


def test_a_queued_job_shows_its_place_and_cancel_means_it_never_starts(browser, app_url, page):
    from playwright.sync_api import expect

    other = _open(browser, app_url)
    try:
        _set_number(page, "ft-steps", 20)
        _set_number(page, "ft-batch", 16)
        page.locator("#ft-method label", has_text="DP-SGD").click()   # new settings: its reference runs too
        page.locator("#ft-run").click()
        expect(page.locator("#ft-status")).to_contain_text("step", timeout=60_000)
        other.locator("#ft-run").click()
        status = other.locator("#ft-status")
        expect(status).to_contain_text("Queued: your fine-tune is 2nd in line")
        expect(status).to_contain_text("Ahead: a fine-tune (another user's")
        other.screenshot(path=str(ARTIFACTS / "app_queued.png"), full_page=False)
        other.locator("#ft-cancel").click()
        expect(status).to_contain_text("Cancelled before it started")
        expect(status).to_contain_text("no ε was spent")
        expect(other.locator("#ft-run")).to_be_enabled()
        expect(page.locator("#ft-verdict")).to_contain_text("Non-private reference, same", timeout=150_000)
        time.sleep(2)  # the line is free now: a cancelled job must still not start
        expect(status).to_contain_text("Cancelled before it started")
        assert "accuracy" not in other.locator("#ft-result").inner_text()
        other.get_by_role("tab", name="Runs").click()
        expect(other.locator("#runs-status")).to_contain_text("No run yet")
    finally:
        other.close()


def test_runs_are_compared_pinned_and_exported_to_the_sweep_tab(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Runs").click()
    expect(page.locator("#runs-status")).to_contain_text("2 run(s) this session")
    expect(page.locator("#runs-table")).to_contain_text("Dual-Priv")
    expect(page.locator("#runs-table")).to_contain_text("DP-SGD")
    expect(page.locator("#runs-figure .js-plotly-plot")).to_be_visible()
    page.locator("#runs-pins input").click()
    page.get_by_role("option").first.click()
    expect(page.locator("#runs-status")).to_contain_text("1 pinned")
    page.locator("#runs-export").click()
    link = page.locator("#runs-download a").first
    expect(link).to_be_visible()
    with page.expect_download() as download:
        link.click()
    csv_path = ARTIFACTS / "app_runs.csv"
    download.value.save_as(csv_path)
    header = csv_path.read_text().splitlines()[0].split(",")
    assert {"method", "epsilon", "accuracy", "seed"} <= set(header), header
    page.screenshot(path=str(ARTIFACTS / "app_runs.png"), full_page=True)
    page.get_by_role("tab", name="Privacy–utility").click()
    page.locator("#sw-csv input[type=file]").set_input_files(str(csv_path))
    expect(page.locator("#sw-status")).to_contain_text("Loaded 2 runs of 2 method(s)")
    expect(page.locator("#sw-figure .js-plotly-plot")).to_be_visible()
    page.locator("#sw-study").get_by_text("The measured study").click()   # the shipped study, losers included
    expect(page.locator("#sw-study-summary")).to_contain_text(
        re.compile("Chosen on the validation split|has not been measured"))   # shipped, or said to be missing
    page.get_by_role("tab", name="Fine-tune").click()


def test_the_audit_shows_its_lower_bound_next_to_the_reported_epsilon(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Audit").click()
    page.locator("#au-epsilon input, #au-epsilon textarea").first.fill("inf")
    _set_number(page, "au-canaries", 64)
    page.locator("#au-run").click()
    verdict = page.locator("#au-verdict")
    expect(verdict).to_contain_text("empirical ε lower bound", timeout=240_000)
    expect(verdict).to_contain_text("ε reported by the accountant")
    expect(verdict).to_contain_text("of 16 (64 canaries)")               # k = m / 8 guesses per side
    expect(page.locator("#au-figure .js-plotly-plot")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "app_audit.png"), full_page=True)
    page.get_by_role("tab", name="Fine-tune").click()


def test_memory_of_the_576_token_preset_with_its_spread(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Memory").click()
    expect(page.locator("#mem-preset input")).to_have_value("llava576")   # the paper's 576 -> 64 comparison
    expect(page.locator("#mem-keep input")).to_have_value("64")
    for label in ("Non-private", "DP-ZO"):  # two methods keep the browser test short
        page.locator("#mem-methods label", has_text=label).click()
    _set_number(page, "mem-repeats", 2)
    page.locator("#mem-run").click()
    expect(page.locator("#mem-status")).to_contain_text("measured 2 method(s) × 2 on llava576", timeout=150_000)
    table = page.locator("#mem-table")
    expect(table).to_contain_text("peak MB min–max")
    expect(table).to_contain_text("576")
    expect(table).to_contain_text("64")
    expect(page.locator("#mem-note")).to_contain_text("Why DP-SGD with LoRA costs about what non-private")
    overflow = page.evaluate("""() => { const t = document.querySelector('#mem-table table');
                                        const box = document.querySelector('#mem-table');
                                        return t.scrollWidth - box.clientWidth; }""")
    assert overflow <= 2, f"the memory table overflows its box by {overflow} px"
    page.screenshot(path=str(ARTIFACTS / "app_memory.png"), full_page=True)
    page.get_by_role("tab", name="Fine-tune").click()


def _photo_zip(folder: Path) -> Path:
    """A small LLaVA zip made here from scikit-learn's two bundled photographs (temple, flower): crops written as
    images, train.json / test.json in the conversation format, plus one record whose image is missing."""
    import json
    import zipfile

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    splits = {"train": [], "test": []}
    for split, count in (("train", 16), ("test", 6)):
        for i in range(count):
            label = i % 2
            top, left = int(rng.integers(0, 300)), int(rng.integers(0, 500))
            name = f"images/{split}-{i}.png"
            Image.fromarray(photos[label][top:top + 96, left:left + 96]).save(folder / name)
            splits[split].append({"id": f"{split}-{i}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\nwhich photo is this ?"},
                {"from": "gpt", "value": ("temple", "flower")[label]}]})
    splits["train"].append({"id": "ghost", "image": "images/missing.png",
                            "conversations": splits["train"][0]["conversations"]})
    for split, records in splits.items():
        (folder / f"{split}.json").write_text(json.dumps(records))
    archive = folder.parent / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in folder.rglob("*"):
            zf.write(file, Path("photos") / file.relative_to(folder))
    return archive


def test_your_data_upload_validate_train_download_the_card_and_ask(page, tmp_path):
    from playwright.sync_api import expect

    archive = _photo_zip(tmp_path / "photos")
    page.get_by_role("tab", name="Your data").click()
    page.locator("#yd-zip input[type=file]").set_input_files(str(archive))
    page.locator("#yd-validate").click()
    status = page.locator("#yd-status")
    expect(status).to_contain_text("Validated: 16 training record(s) accepted. 1 refused record(s)", timeout=60_000)
    expect(page.locator("#yd-summary")).to_contain_text("'temple' (8)")
    expect(page.locator("#yd-refused")).to_contain_text("ghost")
    expect(page.locator("#yd-refused")).to_contain_text("not found")
    _set_number(page, "yd-steps", 10)
    _set_number(page, "yd-batch", 8)
    page.locator("#yd-run").click()
    expect(page.locator("#yd-train-status")).to_contain_text("Finished: 10 steps", timeout=150_000)
    expect(page.locator("#yd-verdict")).to_contain_text("majority class")   # read against its own test set
    print("verdict on the user's photos:", page.locator("#yd-verdict").inner_text())
    result = page.locator("#yd-result").inner_text()
    assert "ε spent / target" in result and "accuracy (your evaluation file)" in result, result
    spent = result.split("ε spent / target")[1].split("/")[0].strip()
    card_link = page.locator("#yd-downloads a[download='README.md']")
    with page.expect_download() as download:
        card_link.click()
    card = ARTIFACTS / "app_model_card.md"
    download.value.save_as(card)
    text = card.read_text()
    assert f"**ε = {spent}** spent (target 3)" in text, (spent, text[:600])
    page.locator("#yd-image input[type=file]").set_input_files(str(tmp_path / "photos" / "images" / "test-0.png"))
    page.locator("#yd-question textarea").fill("which photo is this ?")
    page.locator("#yd-ask").click()
    expect(page.locator("#yd-answer")).to_contain_text("Answer:", timeout=60_000)
    expect(page.locator("#yd-overlay .js-plotly-plot")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "app_your_data.png"), full_page=True)
    page.get_by_role("tab", name="Fine-tune").click()


def test_another_browser_cannot_fetch_the_export_and_a_new_upload_clears_it(browser, page, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Your data").click()
    card = page.locator("#yd-downloads a[download='README.md']")
    url = card.get_attribute("href")
    url = url if url.startswith("http") else page.url.rstrip("/") + "/" + url.lstrip("/")
    assert page.context.request.get(url).status == 200            # the owner fetches it
    other = browser.new_context()
    try:
        other.new_page().goto(page.url)                           # another session, with the URL in hand
        assert other.request.get(url).status == 404
    finally:
        other.close()
    page.get_by_role("tab", name="Runs").click()                  # the user-data run and the audit are listed
    table = page.locator("#runs-table")
    expect(table).to_contain_text("photos.zip")
    expect(table).to_contain_text("canaries")
    page.get_by_role("tab", name="Your data").click()
    uploads = SERVER["temp"] / "runs" / "uploads"
    before = sorted(uploads.iterdir())
    evil = tmp_path / "evil.zip"
    with __import__("zipfile").ZipFile(evil, "w") as zf:
        for i in range(10):
            zf.writestr(f"photos/images/{i}.png", "x")
        zf.writestr("../escaped.txt", "x")
    page.locator("#yd-zip").get_by_role("button", name=re.compile("clear|remove", re.I)).first.click()
    page.locator("#yd-zip input[type=file]").set_input_files(str(evil))   # a second upload
    page.locator("#yd-validate").click()
    expect(page.locator("#yd-status")).to_contain_text("points outside the zip's own folder")
    expect(page.locator("#yd-result")).not_to_contain_text("Your model")  # the first data set's results left
    expect(page.locator("#yd-downloads a")).to_have_count(0)
    assert sorted(uploads.iterdir()) == before                      # the refused zip left no file
    assert uploads.stat().st_mode & 0o777 == 0o700
    page.get_by_role("tab", name="Fine-tune").click()


def test_finetune_bad_input_and_tokens_in_chromium(page):
    from playwright.sync_api import expect

    page.locator("#ft-method label", has_text="Dual-Priv").click()
    page.locator("#ft-compare input").uncheck()  # the reference of these settings is not needed here
    # 1. a short Dual-Priv fine-tune with ε = 2 and our own prune ratios, to the end
    _set_number(page, "ft-epsilon", 2)
    _set_number(page, "ft-token-ratio", 0.5)
    _set_number(page, "ft-grad-ratio", 0.3)
    _set_number(page, "ft-steps", 3)
    _set_number(page, "ft-batch", 8)
    started = time.monotonic()
    page.locator("#ft-run").click()
    status = page.locator("#ft-status")
    expect(status).to_contain_text("Finished 3 steps", timeout=120_000)
    elapsed = time.monotonic() - started
    result = page.locator("#ft-result")
    expect(result).to_contain_text("accuracy")
    text = result.inner_text()
    assert "ε spent / target" in text and "/ 2 (δ = 1e-05)" in text, text
    assert "32 of 64 (dual-priv)" in text, text  # token prune ratio 0.5 reached the run
    expect(page.locator("#ft-curve .js-plotly-plot")).to_be_visible()
    page.locator("#ft-result").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "app_finetune.png"), full_page=True)
    print(f"fine-tune of 3 steps in the browser: {elapsed:.1f} s")

    # 2. a bad input: ε = 0 shows a message and starts nothing
    _set_number(page, "ft-epsilon", 0)
    page.locator("#ft-run").click()
    expect(status).to_contain_text("Not started: ε must be a finite number > 0")
    expect(result).not_to_contain_text("accuracy")  # the previous result is cleared: nothing ran
    expect(page.get_by_text("Not started: ε must be a finite number > 0").first).to_be_visible()
    expect(page.get_by_text(TOAST_TEXT).first).to_be_visible()  # one toast points at the status line
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "app_bad_input.png"), full_page=False)

    # 3. the visual tokens view: an overlay of the default test image with a 0.75 budget
    page.get_by_role("tab", name="Visual tokens").click()
    page.locator("#tok-run").click()
    expect(page.locator("#tok-status")).to_contain_text("64 patches -> 16 visual tokens")
    expect(page.locator("#tok-overlay .js-plotly-plot")).to_be_visible()
    expect(page.locator("#tok-overlay")).to_contain_text("dual-priv: 64 -> 16 visual tokens")
    expect(page.locator("#tok-summary")).to_contain_text("16 visual tokens reach the LLM instead of 64")
    expect(page.locator("#tok-summary")).to_contain_text("[CLS] token pays to each patch")
    expect(page.locator("#tok-original img")).to_be_visible()   # the image as given, beside the decision
    expect(page.locator("#tok-overlay")).to_contain_text("contextual clusters")
    page.screenshot(path=str(ARTIFACTS / "app_tokens.png"), full_page=True)


def test_an_epsilon_of_a_billion_is_flagged(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Fine-tune").click()
    _set_number(page, "ft-epsilon", "1e9")
    _set_number(page, "ft-steps", 2)
    page.locator("#ft-run").click()
    expect(page.locator("#ft-verdict")).to_contain_text("Effectively non-private", timeout=60_000)


def test_the_server_log_is_readable(page):
    """After every job above: no profiler chatter, no error line, no carriage-return progress bar in one line."""
    log = (ARTIFACTS / "app_browser_server.log").read_text()
    lines = log.splitlines()
    assert not [line for line in lines if "ERROR" in line or "USDT" in line or "Traceback" in line], log[-2000:]
    assert max((len(line) for line in lines), default=0) < 500 and "\r" not in log
