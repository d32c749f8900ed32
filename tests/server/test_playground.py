"""The playground in a real browser: Debian's chromium driven by Playwright against a live `seriatim serve` with
SmolLM2. Screenshots of each state go to the test's folder (and to $SERIATIM_SCREENSHOTS, if set)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import httpx
import pytest

from seriatim.server.state import ServerConfig
from support.live_server import LiveServer

pytestmark = pytest.mark.real_model
CHROMIUM = "/usr/bin/chromium"
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def live(smollm2_gguf_path):
    server = LiveServer(ServerConfig(model="smollm2-135m")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if folder := os.environ.get("SERIATIM_SCREENSHOTS"):
        shutil.copy(path, Path(folder) / path.name)


def generate(page, max_tokens: int, temperature: str = "0.8") -> None:
    page.fill("#prompt", PROMPT)
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", temperature)
    page.fill("#seed", "7")
    page.click("#generate")


def test_tokens_alternatives_branches_and_stop(live, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    response = page.goto(live.url + "/")
    # The page is served with a content-security policy, and nothing it does runs foul of it.
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_selector("#model:has-text('smollm2-135m')")
    generate(page, 12)
    page.wait_for_selector("#status:has-text('branch 1: done')", timeout=60_000)
    chips = page.locator(".branch >> nth=0 >> .chip:not(.prompt)")
    assert chips.count() == 12

    # The numbers the page shows are the API's: the same request through /v1/completions.
    ids = httpx.post(live.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    api = httpx.post(live.url + "/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0.8,
                                                          "seed": 7, "logprobs": 10}, timeout=60).json()
    expected = [f"{100 * math.exp(lp):.1f}%" for lp in api["choices"][0]["logprobs"]["token_logprobs"]]
    shown = [chips.nth(i).get_attribute("aria-label").split("probability ")[1] for i in range(12)]
    assert shown == expected
    assert not [e for e in errors if "Content Security Policy" in e]

    chips.nth(2).click()
    rows = page.locator("#detail tbody tr")
    assert rows.count() == 10 and page.locator("#detail").inner_text().count("%") >= 20

    rows.nth(1).locator("button").click()  # the second most likely alternative: a new branch
    page.wait_for_selector("#status:has-text('branch 2: done')", timeout=60_000)
    assert page.locator(".branch").count() == 2
    assert "from token 3 of branch 1" in page.locator(".branch >> nth=1 >> h2").inner_text()
    chips.nth(2).click()
    shot(page, tmp_path, "playground-1280")

    # Greedy: every alternative but the top one is removed by "greedy", and the processed top is 100%.
    generate(page, 3, temperature="0")
    page.wait_for_selector("#status:has-text('branch 3: done')", timeout=60_000)
    page.locator(".branch >> nth=2 >> .chip:not(.prompt)").first.click()
    assert page.locator("#detail td.removed").count() == 9 and "100.00%" in page.locator("#detail").inner_text()

    # A regular expression: the grammar's mask shows among the removals.
    page.select_option("#constraint", "guided_regex")
    page.fill("#constraint_text", " (red|green|blue)!")
    generate(page, 10)
    page.wait_for_selector("#status:has-text('branch 4: done')", timeout=60_000)
    texts = page.locator(".branch >> nth=3 >> .chip:not(.prompt)").all_inner_texts()  # the EOS chip ends it
    assert "".join(texts).strip() in ("red!<|im_end|>", "green!<|im_end|>", "blue!<|im_end|>")
    page.locator(".branch >> nth=3 >> .chip:not(.prompt)").first.click()
    assert "grammar" in page.locator("#detail").inner_text()
    page.select_option("#constraint", "")

    # Stop mid-stream: the request is aborted on the server.
    aborted = live.metric("seriatim_requests_aborted_total")
    generate(page, 2000)
    # A locator, not wait_for_function: the page's content-security policy forbids the eval that needs.
    page.locator(".branch:nth-child(5) .chip:not(.prompt)").nth(2).wait_for(timeout=60_000)
    page.click("#stop")
    page.wait_for_selector("#status:has-text('branch 5: stopped')")
    for _ in range(100):
        if live.metric("seriatim_requests_aborted_total") > aborted:
            break
        page.wait_for_timeout(100)
    assert live.metric("seriatim_requests_aborted_total") == aborted + 1
    page.close()


def test_narrow_screens_and_the_keyboard(live, browser, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(live.url + "/")
    page.wait_for_selector("#model:has-text('smollm2-135m')")
    page.check("input[name=mode][value=chat]")  # through the chat template
    page.fill("#prompt", "Name a colour.")
    page.fill("#max_tokens", "8")
    page.focus("#generate")
    page.keyboard.press("Enter")
    page.wait_for_selector("#status:has-text('branch 1: done')", timeout=60_000)
    assert page.locator(".branch .timeline .bar.prefill").count() == 1  # the rendered chat prompt in one pass
    page.locator(".chip:not(.prompt)").first.focus()
    page.keyboard.press("Enter")  # chips are buttons: the keyboard opens a token's alternatives
    assert page.locator("#detail tbody tr").count() == 10
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
    shot(page, tmp_path, "playground-390")
    page.close()
