"""The demo in a real browser: ``app.py``'s server on a free loopback port, driven by Playwright in Debian's
headless Chromium (``/usr/bin/chromium``; ``.ci/run`` installs it). Every request the page makes outside
127.0.0.1 is blocked and recorded, and the test fails if there was any.

Set ``DIFFKIT_APP_SCREENSHOT=path.png`` to also write the README's screenshot there (<= 300 KB).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from _loopback import LOOPBACK, free_loopback_port

from diffkit.app.main import prepare

# Gradio's usage analytics would try to reach the internet; the demo's entry point turns them off too.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT_LIMIT = 300 * 1024

# Gradio's queue calls pandas APIs that pandas 3 deprecates; that is Gradio's business, not this test's.
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo as ``python app.py --port N`` starts it: no model argument, so the shipped reference model
    (or, where it is not installed, the tiny zoo:sd15 fallback); yields its URL."""
    root = tmp_path_factory.mktemp("app")
    port = free_loopback_port()
    demo, launch = prepare(["--port", str(port), "--pruning-dir", str(root / "pruning"), "--erasure-dir",
                            str(root / "erasure")])
    assert launch["server_name"] == LOOPBACK and launch["share"] is False
    demo.launch(**launch, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium (see .ci/run)"
    with sync_playwright() as p:
        # The resolver rule makes every host name except the loopback address unresolvable.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {LOOPBACK}"])
        yield b
        b.close()


def open_page(browser, server):
    """A fresh browser context (a separate user) on the demo, and the list of blocked outside requests."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    outside: list[str] = []

    def guard(route):
        url = route.request.url
        if url.startswith((server + "/", "data:", "blob:")) or url == server:
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    pg.route("**/*", guard)
    pg.goto(server + "/")
    pg.locator("#generate").wait_for()
    return context, pg, outside


@pytest.fixture
def page(browser, server):
    """A fresh page on the demo; fails the test if it asked for anything outside the loopback server."""
    context, pg, outside = open_page(browser, server)
    yield pg
    context.close()
    assert outside == [], f"the page requested addresses outside {LOOPBACK}: {outside}"


def save_screenshot(pg, path: Path) -> Path:
    """A PNG of the page, palette-quantized so that it stays small (the README's <= 300 KB)."""
    from PIL import Image

    raw = path.with_suffix(".raw.png")
    pg.screenshot(path=str(raw), full_page=True)
    Image.open(raw).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(
        path, optimize=True)
    raw.unlink()
    return path


def test_generate_in_compare_mode(page, tmp_path):
    page.locator("#prompt textarea").fill("a red solid star on a white background")
    page.locator("#steps input").fill("10")
    page.locator("#method").get_by_text("APG", exact=True).click()
    page.get_by_label("eta (parallel weight, 0-1)").wait_for(state="visible")
    assert not page.get_by_label("CFG scale (also the baseline's in compare mode)").is_visible()
    page.locator("#deepcache input[type=checkbox]").check()
    page.get_by_label("interval N").fill("2")
    assert page.locator("#compare input[type=checkbox]").is_checked()
    page.locator("#generate").click()
    baseline = page.locator("#baseline-image img")
    configured = page.locator("#configured-image img")
    baseline.wait_for(timeout=30_000)
    configured.wait_for(timeout=30_000)
    status = page.locator("#generate-status")
    status.get_by_text("Speedup:").wait_for(timeout=30_000)
    text = status.inner_text()
    assert re.search(r"Speedup: \d+\.\d\dx", text), text
    assert re.search(r"Baseline: \d+\.\d\d s · Configured: \d+\.\d\d s", text), text
    assert re.search(r"PSNR vs baseline: (\d+\.\d\d dB|identical)", text), text
    assert "10 steps, APG 15 (eta 0, r 15, beta -0.5), DeepCache N=2 branch 0 uniform" in text
    widths = [page.evaluate("(el) => el.naturalWidth", img.element_handle()) for img in (baseline, configured)]
    assert widths[0] == widths[1] >= 64, widths  # both images loaded, at the model's resolution
    shot = save_screenshot(page, tmp_path / "app.png")
    assert shot.stat().st_size <= SCREENSHOT_LIMIT
    if os.environ.get("DIFFKIT_APP_SCREENSHOT"):
        save_screenshot(page, Path(os.environ["DIFFKIT_APP_SCREENSHOT"]))


def test_empty_prompt_shows_a_friendly_message(page):
    page.locator("#prompt textarea").fill("   ")
    page.locator("#generate").click()
    message = page.locator("#generate-status").get_by_text("Please enter a prompt.")
    message.wait_for(timeout=30_000)
    assert page.locator("#generate-status").inner_text().strip() == "⚠️ Please enter a prompt."
    assert page.locator("#configured-image img").count() == 0
    assert "Traceback" not in page.content()


def test_pick_a_diffusers_guider_by_name(page):
    page.locator("#prompt textarea").fill("a red solid star on a white background")
    page.locator("#steps input").fill("4")
    page.locator("#compare input[type=checkbox]").uncheck()
    page.locator("#method").get_by_text("Diffusers guider", exact=True).click()
    page.locator("#guider input").wait_for(state="visible")
    assert page.locator("#guider input").input_value() == "pag"
    assert page.locator("#guider-scale input").input_value() == "3"
    page.locator("#guider input").click()
    page.get_by_role("option", name="tcfg", exact=True).click()
    # The scale box follows the guider: its label says what the scale sets, its value is that guider's default.
    page.get_by_label("scale: TangentialClassifierFreeGuidance's guidance_scale (0-50)").wait_for(state="visible")
    assert page.locator("#guider-scale input").input_value() == "7.5"
    page.locator("#guider-scale input").fill("6")
    page.locator("#generate").click()
    page.locator("#generate-status").get_by_text("diffusers guider tcfg 6").wait_for(timeout=30_000)
    page.locator("#configured-image img").wait_for(timeout=30_000)
    assert "Traceback" not in page.content()


def start_generate(pg, seed: int) -> None:
    """Fill the form for one image (compare mode off) with ``seed`` and click Generate."""
    pg.locator("#prompt textarea").fill("a blue striped circle on a black background")
    pg.locator("#seed input").fill(str(seed))
    pg.locator("#steps input").fill("4")
    pg.locator("#compare input[type=checkbox]").uncheck()
    pg.locator("#generate").click()


def shown_image(pg, seed: int) -> np.ndarray:
    """Wait for the result of ``seed`` and return the configured image's pixels as the page received them."""
    from PIL import Image

    pg.locator("#generate-status").get_by_text(f"seed {seed}, ").wait_for(timeout=30_000)
    src = pg.locator("#configured-image img").get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(pg.request.get(src).body())).convert("RGB"))


def test_two_users_at_once_get_their_own_results(browser, server):
    users = [open_page(browser, server) for _ in range(2)]
    (_, first, _), (_, second, _) = users
    start_generate(first, seed=1)
    start_generate(second, seed=2)  # queued while the first request runs
    one, two = shown_image(first, 1), shown_image(second, 2)
    assert one.shape == two.shape and one.shape[2] == 3 and not np.array_equal(one, two)
    start_generate(first, seed=2)  # the second user's request, alone: the same image
    first.locator("#generate-status").get_by_text("seed 1, ").wait_for(state="detached", timeout=30_000)
    assert np.array_equal(shown_image(first, 2), two)
    for context, _, outside in users:
        context.close()
        assert outside == []


def test_edit_and_erase_tabs(page):
    start_generate(page, seed=3)
    shown_image(page, 3)
    page.get_by_role("tab", name="Edit").click()
    page.get_by_text("Use the last configured image from Generate").click()
    page.locator("#edit-image img").wait_for()
    page.locator("#source-prompt textarea").fill("a blue striped circle on a black background")
    page.locator("#target-prompt textarea").fill("a red striped circle on a black background")
    page.locator("#edit-steps input").fill("4")
    page.locator("#edit").click()
    page.locator("#edit-status").get_by_text("reconstruction PSNR").wait_for(timeout=30_000)
    assert re.search(r"Inversion \+ 2 generations: \d+\.\d\d s · reconstruction PSNR: \d+\.\d\d dB",
                     page.locator("#edit-status").inner_text())
    for name in ("original", "reconstruction", "edited"):
        page.locator(f"#{name}-image img").wait_for()

    page.get_by_role("tab", name="Erase").click()
    assert page.locator("#forget-prompt textarea").input_value() == "a red solid star on a white background"
    assert page.locator("#retain-prompt textarea").input_value() == "a green solid star on a white background"
    # The defaults that finish within 30 s with a visible effect (tests/test_app_logic.py measures them).
    assert page.locator("#erase-method input").input_value() == "esd"
    assert page.locator("#erase-steps input").input_value() == "40"
    assert page.locator("#sample-steps input").input_value() == "20"
    page.locator("#erase-steps input").fill("2")
    page.locator("#sample-steps input").fill("3")
    page.locator("#erase").click()
    page.locator("#erase-status").get_by_text("artifact").wait_for(timeout=60_000)
    text = page.locator("#erase-status").inner_text()
    artifact = re.search(r"artifact: (\S+) \(now listed", text)
    assert text.startswith("Erasure trained in ") and artifact, text
    for name in ("before-forget", "after-forget", "before-retain", "after-retain"):
        page.locator(f"#{name}-image img").wait_for()
    page.get_by_role("tab", name="Generate").click()
    page.locator("#erasure input").click()
    assert Path(artifact.group(1)).name in page.get_by_role("option").all_inner_texts()


def test_the_lora_choice_is_on_the_generate_tab(page):
    lora = page.locator("#lora input")
    lora.wait_for(state="visible")
    assert lora.input_value() == "(none)"  # no LoRA unless one is picked from --lora-dir's folders
    assert page.get_by_label(re.compile(r"^LoRA \(folders in .*lora\)$")).count() == 1
