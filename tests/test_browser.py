"""The web pages in a real browser: Debian's chromium, driven by Playwright.

Skipped, saying so, only where no chromium is installed; `.ci/run` installs
it. A screenshot of the poll page is left in build/test-artifacts/.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from playwright.async_api import Page, async_playwright, expect

from ingest.app import create_app
from voteflow.servers import free_port
from voteflow.settings import Settings

from .support import ADMIN, InProcessWorker, ballot, create_poll

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
# Milliseconds a page may take to show what a commit changed.
LIVE_TIMEOUT = 15_000

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)


def _count(page: Page, poll: dict[str, Any], option: int) -> Any:
    option_id = poll["options"][option]["id"]
    return page.locator(f'li[data-option-id="{option_id}"] .bar-count')


async def test_poll_page_follows_the_tally_live_and_casts_a_vote(
    edge: TestClient[Any, Any], worker: InProcessWorker
) -> None:
    poll = await create_poll(edge, question="Best colour?", options=["Red", "Green", "Blue"])
    base = str(edge.make_url("")).rstrip("/")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 800, "height": 1000})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(str(error)))

            await page.goto(f"{base}/polls/{poll['id']}")
            await expect(page.locator("h1")).to_have_text("Best colour?")
            await expect(page.locator("#status")).to_have_text("Live")

            for voter, option in (("ann", 0), ("bob", 0), ("cat", 2)):
                response = await edge.post("/api/vote", json=ballot(poll, voter, option))
                assert response.status == 202
            await expect(_count(page, poll, 0)).to_have_text("2 · 67%", timeout=LIVE_TIMEOUT)
            await expect(_count(page, poll, 2)).to_have_text("1 · 33%", timeout=LIVE_TIMEOUT)
            await expect(page.locator("#total")).to_have_text("3 ballots")

            # A vote from the page's own form, all the way to its bar.
            await page.get_by_label("Green").check()
            await page.get_by_role("button", name="Vote").click()
            await expect(page.locator("#vote-result")).to_contain_text("Vote received")
            await expect(_count(page, poll, 1)).to_have_text("1 · 25%", timeout=LIVE_TIMEOUT)
            await expect(page.locator("#total")).to_have_text("4 ballots")
            red_bar = page.locator(f'li[data-option-id="{poll["options"][0]["id"]}"] .bar-fill')
            await expect(red_bar).to_have_attribute("style", re.compile(r"width: 50%"))

            # A ballot the edge refuses is said so on the page, and counts nothing.
            response = await edge.post(f"/api/polls/{poll['id']}/close", headers=ADMIN)
            assert response.status == 200
            await page.get_by_role("button", name="Vote").click()
            await expect(page.locator("#vote-result")).to_contain_text("Not counted: ")
            await expect(page.locator("#total")).to_have_text("4 ballots")

            # The votes-per-second line has been drawn (the canvas is not blank).
            await page.wait_for_function(
                "() => { const c = document.getElementById('rate');"
                " return c.getContext('2d').getImageData(0, 0, c.width, c.height)"
                ".data.some((v) => v !== 0); }",
                timeout=LIVE_TIMEOUT,
            )
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "poll-page.png"), full_page=True)

            # The list at / links to the open polls only.
            other = await create_poll(edge, question="Tea or coffee?")
            await page.goto(f"{base}/")
            await expect(page.get_by_role("link", name="Best colour?")).to_have_count(0)
            await page.get_by_role("link", name="Tea or coffee?").click()
            await expect(page).to_have_url(f"{base}/polls/{other['id']}")
            await expect(page.locator("#total")).to_have_text("0 ballots")
            assert problems == []
        finally:
            await browser.close()


async def _serve(settings: Settings, port: int) -> web.AppRunner:
    """An edge on a fixed port, so that it can be stopped and started again there."""
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_poll_page_says_when_disconnected_and_catches_up_after(
    edge: TestClient[Any, Any], worker: InProcessWorker, settings: Settings
) -> None:
    poll = await create_poll(edge, question="Still there?", options=["Yes", "No"])
    port = free_port()
    runner = await _serve(settings, port)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{port}/polls/{poll['id']}")
            await expect(page.locator("#status")).to_have_text("Live")

            await runner.cleanup()  # the page's edge goes away
            await expect(page.locator("#status")).to_have_text(
                "Disconnected, reconnecting…", timeout=LIVE_TIMEOUT
            )
            # Votes committed while it is away, through another edge...
            for voter in ("ann", "bob"):
                response = await edge.post("/api/vote", json=ballot(poll, voter, 0))
                assert response.status == 202
            runner = await _serve(settings, port)
            # ...are on the page once it is back: it resumes from the snapshot.
            await expect(page.locator("#status")).to_have_text("Live", timeout=LIVE_TIMEOUT)
            await expect(_count(page, poll, 0)).to_have_text("2 · 100%", timeout=LIVE_TIMEOUT)
        finally:
            await browser.close()
            await runner.cleanup()
