"""The presenter view, /polls/{id}/present, on a projector's screen: Debian's
chromium at 1920x1080 against a real edge and worker.

Screenshots of it, dark and light, are left in build/test-artifacts/
(present-dark.png, present-light.png).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from asyncio.subprocess import PIPE
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Page, expect

from tests.browser import (
    LIVE_TIMEOUT,
    PROJECTOR,
    accessibility_problems,
    chromium,
    needs_chromium,
    screenshot,
)
from tests.support import ADMIN, InProcessWorker, ballot, create_poll

pytestmark = needs_chromium

Client = TestClient[Any, Any]
ZBARIMG = shutil.which("zbarimg")
needs_zbarimg = pytest.mark.skipif(
    ZBARIMG is None, reason="zbarimg is not installed (apt-get install zbar-tools)"
)
OPTIONS = ["Mountains", "Seaside", "A city", "Stay at home"]
# The presenter view re-reads the poll every 5 s: a close shows within this.
CLOSE_SHOWN_MS = 10_000


def _base(edge: Client) -> str:
    return str(edge.make_url("")).rstrip("/")


def _option(page: Page, poll: dict[str, Any], index: int) -> Any:
    return page.locator(f'#bars li[data-option-id="{poll["options"][index]["id"]}"]')


async def _vote(edge: Client, poll: dict[str, Any], voters: dict[str, int]) -> None:
    for voter, option in voters.items():
        response = await edge.post("/api/vote", json=ballot(poll, voter, option))
        assert response.status == 202, await response.text()


async def _fits_the_screen(page: Page) -> None:
    size = await page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    assert size[0] <= 1920 and size[1] <= 1080, size


async def _shows(page: Page, poll: dict[str, Any], votes: list[int]) -> None:
    """Each option's bar holds its votes, and the total and its note agree."""
    for index, count in enumerate(votes):
        await expect(_option(page, poll, index)).to_have_attribute(
            "data-votes", str(count), timeout=LIVE_TIMEOUT
        )
    total = sum(votes)  # one option a ballot here
    await expect(page.locator("#total")).to_have_text(f"{total} ballots")
    await expect(page.locator("#share-note")).to_have_text(f"Percentages are of {total} ballots.")
    share = round(100 * votes[0] / total)
    await expect(_option(page, poll, 0).locator(".present-count")).to_have_text(
        f"{votes[0]} votes · {share}%"
    )


async def test_presenter_view_follows_the_votes_live_on_a_projector_dark_and_light(
    edge: Client, worker: InProcessWorker
) -> None:
    poll = await create_poll(edge, question="Where should the team offsite go?", options=OPTIONS)
    async with chromium() as browser:
        page = await browser.new_page(**PROJECTOR)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))

        await page.goto(f"{_base(edge)}/polls/{poll['id']}/present")
        assert await page.get_attribute("html", "data-theme") == "dark"
        await expect(page.locator("h1")).to_have_text(poll["question"])
        await expect(page.locator("#status")).to_have_text("Live")
        await expect(page.locator("#bars li")).to_have_text(
            [re.compile("^" + re.escape(label)) for label in OPTIONS]
        )
        await expect(page.locator("#total")).to_have_text("0 ballots")
        await expect(page.get_by_role("button", name="Full screen")).to_be_visible()

        # Two waves of votes a second or more apart: the bars follow each, and
        # the chart of ballots over time has a curve to draw.
        await _vote(edge, poll, {"ann": 0, "bob": 0, "cat": 1})
        await _shows(page, poll, [2, 1, 0, 0])
        await asyncio.sleep(1.1)
        wave = {f"voter-{i}": i % 4 for i in range(14)} | {"dan": 0, "eve": 0, "fay": 1}
        await _vote(edge, poll, wave)
        await _shows(page, poll, [8, 6, 3, 3])
        await expect(page.locator("#chart")).to_have_attribute(
            "data-points", re.compile(r"^([3-9]|\d\d+)$"), timeout=LIVE_TIMEOUT
        )
        await expect(page.locator("#chart canvas")).to_be_visible()
        await expect(page.locator("#countdown")).to_be_hidden()  # no expires_at
        await _fits_the_screen(page)
        assert await accessibility_problems(page) == []
        await screenshot(page, "present-dark")

        await page.goto(f"{_base(edge)}/polls/{poll['id']}/present?theme=light")
        assert await page.get_attribute("html", "data-theme") == "light"
        await expect(page.locator("#status")).to_have_text("Live")
        await _shows(page, poll, [8, 6, 3, 3])
        await _vote(edge, poll, {"gus": 3, "hal": 3})
        await _shows(page, poll, [8, 6, 3, 5])
        await expect(page.locator("#chart canvas")).to_be_visible()
        await _fits_the_screen(page)
        assert await accessibility_problems(page) == []
        await screenshot(page, "present-light")
        assert errors == []


async def test_presenter_view_says_a_ballot_may_name_several_options(
    edge: Client, worker: InProcessWorker
) -> None:
    poll = await create_poll(edge, question="Which talks?", options=OPTIONS, max_choices=3)
    body = {**ballot(poll, "ann"), "option_ids": [o["id"] for o in poll["options"][:3]]}
    response = await edge.post("/api/vote", json=body)
    assert response.status == 202
    async with chromium() as browser:
        page = await browser.new_page(**PROJECTOR)
        await page.goto(f"{_base(edge)}/polls/{poll['id']}/present")
        await expect(_option(page, poll, 2)).to_have_attribute(
            "data-votes", "1", timeout=LIVE_TIMEOUT
        )
        await expect(page.locator("#total")).to_have_text("1 ballot")
        await expect(page.locator("#share-note")).to_have_text(
            "Percentages are of 1 ballot. A ballot may name up to 3 options,"
            " so they can add up to more than 100%."
        )
        await expect(_option(page, poll, 1).locator(".present-count")).to_have_text("1 vote · 100%")


@needs_zbarimg
async def test_qr_code_read_off_the_screen_opens_the_voting_page(edge: Client) -> None:
    poll = await create_poll(edge, question="Can you read me?", options=OPTIONS)
    share = await (await edge.get(f"/api/polls/{poll['id']}/share")).json()
    async with chromium() as browser:
        page = await browser.new_page(**PROJECTOR)
        await page.goto(f"{_base(edge)}/polls/{poll['id']}/present")
        qr = page.locator("img#qr")
        await expect(qr).to_have_attribute("alt", f"QR code for {share['short_url']}")
        await expect(qr).to_be_visible()
        await page.wait_for_function("() => document.getElementById('qr').complete")
        box = await qr.bounding_box()
        assert box is not None and box["width"] >= 400, box  # a large code reads from afar
        short = share["short_url"].removeprefix("http://")
        await expect(page.locator("#short-url")).to_have_text(short)
        png = await screenshot(page, "present-qr")
        await page.get_by_role("button", name="Full screen").click()
        await expect(page.get_by_role("button", name="Exit full screen")).to_be_visible()
        assert await page.evaluate("() => document.fullscreenElement === document.documentElement")

    assert ZBARIMG is not None
    zbar = await asyncio.create_subprocess_exec(
        ZBARIMG, "--raw", "-q", str(png), stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(zbar.communicate(), 30)
    assert zbar.returncode == 0, err.decode()
    url = out.decode().strip()
    assert url == share["short_url"]
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert response.url.path == f"/polls/{poll['id']}"
        assert response.history[0].status == 302


async def test_presenter_view_counts_down_then_says_closed_without_a_reload(
    edge: Client,
) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=4)
    poll = await create_poll(
        edge, question="Quick one?", options=OPTIONS, expires_at=expires.isoformat()
    )
    async with chromium() as browser:
        page = await browser.new_page(**PROJECTOR)
        await page.goto(f"{_base(edge)}/polls/{poll['id']}/present")
        await page.evaluate("() => { window.sameDocument = true; }")
        countdown = page.locator("#countdown")
        await expect(countdown).to_have_text(re.compile(r"^Closes in 0:0[1-4]$"))
        shown = await countdown.text_content()
        await screenshot(page, "present-countdown")
        await expect(countdown).not_to_have_text(shown or "")  # it ticks
        await expect(page.locator("#status")).to_have_text("Closed", timeout=6_000)
        await expect(countdown).to_be_hidden()
        await expect(page.locator("img#qr")).to_be_hidden()  # no call to vote any more
        await expect(page.locator("#total")).to_have_text("Final count: 0 ballots")
        assert await page.evaluate("() => window.sameDocument") is True
        await _fits_the_screen(page)


async def test_presenter_view_shows_a_close_by_an_admin_within_seconds(
    edge: Client, worker: InProcessWorker
) -> None:
    poll = await create_poll(edge, question="Shall we stop here?", options=OPTIONS)
    await _vote(edge, poll, {"ann": 1})
    async with chromium() as browser:
        page = await browser.new_page(**PROJECTOR)
        await page.goto(f"{_base(edge)}/polls/{poll['id']}/present?theme=light")
        await expect(_option(page, poll, 1)).to_have_attribute(
            "data-votes", "1", timeout=LIVE_TIMEOUT
        )
        await page.evaluate("() => { window.sameDocument = true; }")
        response = await edge.post(f"/api/polls/{poll['id']}/close", headers=ADMIN)
        assert response.status == 200
        await expect(page.locator("#status")).to_have_text("Closed", timeout=CLOSE_SHOWN_MS)
        await expect(page.locator("#total")).to_have_text("Final count: 1 ballot")
        await expect(page.locator("img#qr")).to_be_hidden()
        assert await page.evaluate("() => window.sameDocument") is True
        await _fits_the_screen(page)
        assert await accessibility_problems(page) == []
        await screenshot(page, "present-closed")


async def test_presenter_view_is_a_page_of_its_own_and_404_for_no_such_poll(
    edge: Client,
) -> None:
    poll = await create_poll(edge)
    response = await edge.get(f"/polls/{poll['id']}/present")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    page = await response.text()
    assert '<html lang="en" data-theme="dark">' in page
    assert "style=" not in page and "<style" not in page
    for asset in ("present.js", "present.css"):
        assert (await edge.get(f"/static/{asset}")).status == 200
    missing = await edge.get(f"/polls/{uuid.uuid4()}/present")
    assert missing.status == 404
    assert missing.content_type == "text/html"
